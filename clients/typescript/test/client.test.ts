// GatewayClient against a fake GatewayService served in process over plain HTTP/2 gRPC
// (connect-node's adapter): bearer tokens (trajectory and inference), the trace
// context, Generate's sample order, and one credit per batch consumed.
import assert from "node:assert/strict";
import * as http2 from "node:http2";
import type { AddressInfo } from "node:net";
import { after, before, describe, test } from "node:test";

import { create } from "@bufbuild/protobuf";
import { Code, ConnectError, type ConnectRouter, type HandlerContext } from "@connectrpc/connect";
import { connectNodeAdapter } from "@connectrpc/connect-node";

import {
  GatewayClient,
  GatewayService,
  GenerateResponseSchema,
  ScoredGroupSchema,
  withTraceContext,
} from "../src/index.js";

const TRAJECTORY = "ts-secret";
const INFERENCE = "ts-inference";
const TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

interface Seen {
  headers: Headers[];
  credits: number[];
  groups: number;
}

function fakeGateway(seen: Seen) {
  const check = (ctx: HandlerContext, token: string) => {
    seen.headers.push(ctx.requestHeader);
    if (ctx.requestHeader.get("authorization") !== `Bearer ${token}`) {
      throw new ConnectError("missing bearer token", Code.Unauthenticated);
    }
  };
  return (router: ConnectRouter) =>
    router.service(GatewayService, {
      async getInfo(_req, ctx) {
        check(ctx, TRAJECTORY);
        return { batchSize: 4n, maxTokenLen: 32n };
      },
      async submitScoredData(requests, ctx) {
        check(ctx, TRAJECTORY);
        let n = 0;
        for await (const _ of requests) n++;
        seen.groups += n;
        return { received: BigInt(n) };
      },
      async *generate(req, ctx) {
        check(ctx, INFERENCE);
        const n = req.request?.samplingParams?.n ?? 1;
        const first = req.request?.inputIds[0] ?? 0;
        for (let i = n - 1; i >= 0; i--) {
          yield {
            response: create(GenerateResponseSchema, {
              index: i,
              payload: { case: "completion", value: { outputIds: [first, 100 + i], outputLogprobs: [-0.5, -1.5] } },
            }),
          };
        }
      },
      async *streamBatches(requests, ctx) {
        check(ctx, TRAJECTORY);
        let step = 0n;
        for await (const req of requests) {
          seen.credits.push(req.credits);
          for (let k = 0; k < req.credits; k++) {
            step++;
            const seq = { tokens: [1, 2], masks: [-100, 2], inferenceLogprobs: [0, -0.25], policyVersion: step };
            yield { step, groups: [{ sequences: [seq] }] };
          }
        }
      },
    });
}

describe("GatewayClient", () => {
  const seen: Seen = { headers: [], credits: [], groups: 0 };
  let server: http2.Http2Server;
  let target = "";

  before(async () => {
    server = http2.createServer(connectNodeAdapter({ routes: fakeGateway(seen) }));
    await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
    target = `127.0.0.1:${(server.address() as AddressInfo).port}`;
  });

  after(() => {
    server.close();
  });

  const cases: Array<{ name: string; token?: string; inferenceToken?: string; trajectoryOk: boolean; generateOk: boolean }> = [
    { name: "no token", trajectoryOk: false, generateOk: false },
    { name: "trajectory token only", token: TRAJECTORY, trajectoryOk: true, generateOk: false },
    { name: "both tokens", token: TRAJECTORY, inferenceToken: INFERENCE, trajectoryOk: true, generateOk: true },
  ];
  for (const c of cases) {
    test(`bearer tokens: ${c.name}`, async () => {
      const client = new GatewayClient(target, { token: c.token, inferenceToken: c.inferenceToken });
      try {
        const outcome = async (p: Promise<unknown>) =>
          p.then(
            () => Code.Unknown + 1000,
            (e: unknown) => ConnectError.from(e).code,
          );
        const ok = Code.Unknown + 1000;
        const want = (yes: boolean) => (yes ? ok : Code.Unauthenticated);
        assert.equal(await outcome(client.gateway.getInfo({})), want(c.trajectoryOk));
        assert.equal(await outcome(client.submit([{ sequences: [] }])), want(c.trajectoryOk));
        assert.equal(await outcome(client.generate({ inputIds: [1] })), want(c.generateOk));
      } finally {
        client.close();
      }
    });
  }

  test("generate answers completions in sample order", async () => {
    const client = new GatewayClient(target, { token: TRAJECTORY, inferenceToken: INFERENCE });
    try {
      const completions = await client.generate({ inputIds: [9], samplingParams: { n: 3 } });
      assert.deepEqual(
        completions.map((c) => c.outputIds),
        [[9, 100], [9, 101], [9, 102]],
      );
    } finally {
      client.close();
    }
  });

  test("the trace context rides on calls made inside withTraceContext only", async () => {
    const client = new GatewayClient(target, { token: TRAJECTORY });
    try {
      await withTraceContext({ traceparent: TRACEPARENT, tracestate: "k=v" }, () => client.gateway.getInfo({}));
      let headers = seen.headers.at(-1)!;
      assert.equal(headers.get("traceparent"), TRACEPARENT);
      assert.equal(headers.get("tracestate"), "k=v");
      await client.gateway.getInfo({});
      headers = seen.headers.at(-1)!;
      assert.equal(headers.get("traceparent"), null);
    } finally {
      client.close();
    }
  });

  for (const { ahead, take, credits } of [
    { ahead: 1, take: 3, credits: [1, 1, 1] },
    { ahead: 2, take: 3, credits: [2, 1, 1] },
  ]) {
    test(`batches: ahead=${ahead} grants one credit per batch consumed`, async () => {
      seen.credits = [];
      const client = new GatewayClient(target, { token: TRAJECTORY });
      try {
        const got = [];
        for await (const batch of client.batches(ahead)) {
          got.push(batch);
          if (got.length === take) break;
        }
        assert.deepEqual(
          got.map((b) => [b.step, b.groups[0]!.sequences[0]!.policyVersion]),
          got.map((_, i) => [BigInt(i + 1), BigInt(i + 1)]),
        );
        assert.deepEqual(got[0]!.groups[0]!.sequences[0]!.inferenceLogprobs, [0, -0.25]);
        // The credit for the last batch is never granted: the loop stopped first.
        assert.deepEqual(seen.credits, credits);
      } finally {
        client.close();
      }
    });
  }

  test("submit accepts generated messages and plain objects", async () => {
    const client = new GatewayClient(target, { token: TRAJECTORY });
    try {
      const before = seen.groups;
      const response = await client.submit([create(ScoredGroupSchema, { sequences: [] }), { sequences: [] }]);
      assert.equal(response.received, 2n);
      assert.equal(seen.groups - before, 2);
    } finally {
      client.close();
    }
  });
});
