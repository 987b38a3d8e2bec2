/**
 * A small hand-written client over the generated clotho.v1 stubs, the same shape as
 * the Python `clotho.client`: connect to a gateway with a bearer token, submit scored
 * groups, generate through the gateway, and consume batches with credit-based flow
 * control. gRPC over HTTP/2 (`@connectrpc/connect-node`'s gRPC transport), which
 * speaks to the gateway's grpcio server as any gRPC client does.
 *
 * A gateway started with `trajectory_token` wants `authorization: Bearer <token>` on
 * every GatewayService call, and with `inference_token` that token on Generate: give
 * them as `token` and `inferenceToken`. W3C trace context (`traceparent`) rides on
 * every call made inside `withTraceContext(...)`.
 */

import { AsyncLocalStorage } from "node:async_hooks";

import { create, type MessageInitShape } from "@bufbuild/protobuf";
import { createClient, type Client, type Interceptor } from "@connectrpc/connect";
import { createGrpcTransport, Http2SessionManager } from "@connectrpc/connect-node";

import {
  GatewayService,
  type GetStatusResponse,
  type RegisterEnvResponse,
  RegisterEnvRequestSchema,
  RegisterTrainerRequestSchema,
  StreamBatchesRequestSchema,
  type StreamBatchesRequest,
  type StreamBatchesResponse,
  SubmitScoredDataRequestSchema,
  type SubmitScoredDataRequest,
  type SubmitScoredDataResponse,
} from "./gen/clotho/v1/gateway_service_pb.js";
import { type Completion, GenerateRequestSchema } from "./gen/clotho/v1/inference_service_pb.js";
import { type ScoredGroup, ScoredGroupSchema } from "./gen/clotho/v1/scored_data_pb.js";

/** A W3C trace context (https://www.w3.org/TR/trace-context/). */
export interface TraceContext {
  /** "00-<trace id>-<parent span id>-<flags>". */
  traceparent: string;
  /** Vendor state, if any. */
  tracestate?: string;
}

const traceStorage = new AsyncLocalStorage<TraceContext>();

/** Runs `fn` with `context` as the trace context of every call made inside it. */
export function withTraceContext<T>(context: TraceContext, fn: () => T): T {
  return traceStorage.run(context, fn);
}

/** Sends the current trace context (see withTraceContext) as `traceparent` metadata. */
export function traceContextInterceptor(current: () => TraceContext | undefined = () => traceStorage.getStore()): Interceptor {
  return (next) => async (req) => {
    const context = current();
    if (context !== undefined && !req.header.has("traceparent")) {
      req.header.set("traceparent", context.traceparent);
      if (context.tracestate) req.header.set("tracestate", context.tracestate);
    }
    return next(req);
  };
}

/** Sends `authorization: Bearer <token>` on every call, or `inferenceToken` on the
 * inference methods (GatewayService.Generate) when given. */
export function bearerInterceptor(token?: string, inferenceToken?: string): Interceptor {
  return (next) => async (req) => {
    const chosen = req.method.name === "Generate" ? (inferenceToken ?? token) : token;
    if (chosen) req.header.set("authorization", `Bearer ${chosen}`);
    return next(req);
  };
}

export interface GatewayClientOptions {
  /** The gateway's trajectory token. */
  token?: string;
  /** The gateway's inference token (Generate); defaults to `token`. */
  inferenceToken?: string;
  /** More interceptors, run after the client's own. */
  interceptors?: Interceptor[];
}

/** Score-able groups: generated messages or plain objects of their shape. */
export type ScoredGroupInit = MessageInitShape<typeof ScoredGroupSchema>;

/** Completions of one prompt, by sample index; generation parameters as InferenceService takes them. */
export type GenerateRequestInit = MessageInitShape<typeof GenerateRequestSchema>;

/** "host:port" or a URL; plain-text HTTP/2 when no scheme is given. */
function baseUrl(target: string): string {
  return /^[a-z]+:\/\//i.test(target) ? target : `http://${target}`;
}

/** Submits scored groups, generates, and streams batches with credit-based flow control. */
export class GatewayClient {
  /** The generated client, for calls the helpers do not wrap (getStatus, getInfo, ...). */
  readonly gateway: Client<typeof GatewayService>;
  private readonly session: Http2SessionManager;

  constructor(target: string, options: GatewayClientOptions = {}) {
    const url = baseUrl(target);
    this.session = new Http2SessionManager(url);
    const transport = createGrpcTransport({
      baseUrl: url,
      sessionManager: this.session,
      interceptors: [
        bearerInterceptor(options.token, options.inferenceToken),
        traceContextInterceptor(),
        ...(options.interceptors ?? []),
      ],
    });
    this.gateway = createClient(GatewayService, transport);
  }

  /** Closes the HTTP/2 connection (calls in flight fail). */
  close(): void {
    this.session.abort();
  }

  [Symbol.dispose](): void {
    this.close();
  }

  registerTrainer(init: MessageInitShape<typeof RegisterTrainerRequestSchema>): Promise<string> {
    return this.gateway.registerTrainer(init).then((r) => r.uuid);
  }

  /** Registers an environment; `status` is "wait for trainer to start" until a trainer asked for a batch. */
  registerEnv(init: MessageInitShape<typeof RegisterEnvRequestSchema>): Promise<RegisterEnvResponse> {
    return this.gateway.registerEnv(init);
  }

  status(): Promise<GetStatusResponse> {
    return this.gateway.getStatus({});
  }

  /** Sends `groups` on one SubmitScoredData stream: all enter the queue together, or none. */
  submit(groups: Iterable<ScoredGroupInit | ScoredGroup>): Promise<SubmitScoredDataResponse> {
    async function* requests(): AsyncGenerator<SubmitScoredDataRequest> {
      for (const group of groups) {
        yield create(SubmitScoredDataRequestSchema, { group: create(ScoredGroupSchema, group as ScoredGroupInit) });
      }
    }
    return this.gateway.submitScoredData(requests());
  }

  /** Every sample's final Completion, in sample order (routed by the gateway to the
   * least loaded healthy inference service). */
  async generate(request: GenerateRequestInit, signal?: AbortSignal): Promise<Completion[]> {
    const done = new Map<number, Completion>();
    const call = this.gateway.generate({ request: create(GenerateRequestSchema, request) }, { signal });
    for await (const message of call) {
      const payload = message.response?.payload;
      if (payload?.case === "completion") done.set(message.response!.index, payload.value);
    }
    return [...done.keys()].sort((a, b) => a - b).map((i) => done.get(i)!);
  }

  /** Batches forever (until `signal` aborts or the loop stops), never holding more than
   * `ahead` unconsumed ones: one new credit is granted each time the caller asks for
   * the next batch. */
  async *batches(ahead = 1, signal?: AbortSignal): AsyncGenerator<StreamBatchesResponse> {
    const credits = new CreditQueue();
    credits.grant(Math.max(1, ahead));
    const controller = new AbortController();
    const abort = () => controller.abort(signal?.reason);
    signal?.addEventListener("abort", abort, { once: true });
    try {
      for await (const batch of this.gateway.streamBatches(credits.requests(), { signal: controller.signal })) {
        yield batch;
        credits.grant(1);
      }
    } finally {
      signal?.removeEventListener("abort", abort);
      credits.end();
      controller.abort();
    }
  }
}

/** The credit side of StreamBatches: an async stream of requests fed by grant(). */
class CreditQueue {
  private pending = 0;
  private ended = false;
  private wake: (() => void) | undefined;

  grant(credits: number): void {
    this.pending += credits;
    this.wake?.();
  }

  end(): void {
    this.ended = true;
    this.wake?.();
  }

  async *requests(): AsyncGenerator<StreamBatchesRequest> {
    while (!this.ended) {
      if (this.pending === 0) {
        await new Promise<void>((resolve) => (this.wake = resolve));
        this.wake = undefined;
        continue;
      }
      const credits = this.pending;
      this.pending = 0;
      yield create(StreamBatchesRequestSchema, { credits });
    }
  }
}
