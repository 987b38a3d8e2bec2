// A trainer-side consumer: registers as the trainer, streams batches from a Clotho
// gateway with credit-based flow control and prints each as one line of protobuf JSON.
//
//   node dist/examples/consumer.js --target 127.0.0.1:50051 --batches 3 --ahead 2
import { parseArgs } from "node:util";

import { GatewayClient, StreamBatchesResponseSchema, toJson } from "../src/index.js";

const { values: args } = parseArgs({
  options: {
    target: { type: "string", default: "127.0.0.1:50051" },
    token: { type: "string", default: process.env.CLOTHO_TRAJECTORY_TOKEN },
    "batch-size": { type: "string", default: "4" },
    batches: { type: "string", default: "3" },
    ahead: { type: "string", default: "2" },
    quiet: { type: "boolean", default: false },
  },
});

const client = new GatewayClient(args.target!, { token: args.token });
const id = await client.registerTrainer({ batchSize: Number(args["batch-size"]), maxTokenLen: 2048 });
console.error(`registered trainer ${id}`);
// With --quiet: only a summary (batches, seconds from the first batch to the last).
let seen = 0;
let first = 0;
for await (const batch of client.batches(Number(args.ahead))) {
  if (seen === 0) first = performance.now();
  if (!args.quiet) console.log(JSON.stringify(toJson(StreamBatchesResponseSchema, batch)));
  if (++seen === Number(args.batches)) break;
}
if (args.quiet) console.log(JSON.stringify({ batches: seen, seconds: (performance.now() - first) / 1000 }));
client.close();
