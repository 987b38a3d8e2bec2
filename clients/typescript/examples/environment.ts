// A TypeScript environment: registers with a Clotho gateway, generates each group
// through the gateway (routed to the inference services), scores the samples and
// submits the scored groups, all over gRPC.
//
//   node dist/examples/environment.js --target 127.0.0.1:50051 --groups 4 --group-size 4
//
// Each submitted group is reported as a JSON line (with --json: the group itself too).
//
// The score is a toy: the fraction of a sample's generated tokens that are even ids.
import { parseArgs } from "node:util";

import { create, GatewayClient, ScoredGroupSchema, toJson, type ScoredGroupInit } from "../src/index.js";

const { values: args } = parseArgs({
  options: {
    target: { type: "string", default: "127.0.0.1:50051" },
    token: { type: "string", default: process.env.CLOTHO_TRAJECTORY_TOKEN },
    "inference-token": { type: "string", default: process.env.CLOTHO_INFERENCE_TOKEN },
    groups: { type: "string", default: "4" },
    "group-size": { type: "string", default: "4" },
    "max-new-tokens": { type: "string", default: "8" },
    json: { type: "boolean", default: false },
  },
});

const groupSize = Number(args["group-size"]);
const client = new GatewayClient(args.target!, { token: args.token, inferenceToken: args["inference-token"] });

// Until a trainer has asked for its first batch, registration answers "wait".
let env = await client.registerEnv({ desiredName: "ts-env", maxTokenLength: 512, weight: 1, groupSize });
while (env.status !== "success") {
  await new Promise((resolve) => setTimeout(resolve, 200));
  env = await client.registerEnv({ desiredName: "ts-env", maxTokenLength: 512, weight: 1, groupSize });
}
console.error(`registered as ${env.wandbName} (env ${env.envId})`);

for (let g = 0; g < Number(args.groups); g++) {
  const prompt = [1, 10 + g, 20 + g];
  const completions = await client.generate({
    inputIds: prompt,
    samplingParams: { n: groupSize, maxNewTokens: Number(args["max-new-tokens"]), temperature: 1 },
  });
  const group: ScoredGroupInit = {
    envId: env.envId,
    sequences: completions.map((c) => ({
      tokens: [...prompt, ...c.outputIds],
      masks: [...prompt.map(() => -100), ...c.outputIds],
      inferenceLogprobs: [...prompt.map(() => 1), ...c.outputLogprobs],
      score: c.outputIds.filter((t) => t % 2 === 0).length / Math.max(1, c.outputIds.length),
    })),
  };
  const answer = await client.submit([group]);
  const versions = completions.map((c) => String(c.versionSpans[0]?.version ?? 0n));
  const line: Record<string, unknown> = { group: g, received: Number(answer.received), buffered: Number(answer.buffered), versions };
  if (args.json) line.submitted = toJson(ScoredGroupSchema, create(ScoredGroupSchema, group));
  console.log(JSON.stringify(line));
}
client.close();
