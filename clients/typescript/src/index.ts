/**
 * @clotho/client: the clotho.v1 gRPC API for TypeScript (Node >= 20, ESM).
 *
 * The hand-written client (GatewayClient) plus every generated message, enum and
 * service of clotho.v1 (protoc-gen-es; `uint64` fields are `bigint`).
 */
export {
  GatewayClient,
  bearerInterceptor,
  traceContextInterceptor,
  withTraceContext,
  type GatewayClientOptions,
  type GenerateRequestInit,
  type ScoredGroupInit,
  type TraceContext,
} from "./client.js";
export * from "./gen/clotho/v1/gateway_service_pb.js";
export * from "./gen/clotho/v1/inference_service_pb.js";
export * from "./gen/clotho/v1/policy_pb.js";
export * from "./gen/clotho/v1/scored_data_pb.js";
export * from "./gen/clotho/v1/trainer_service_pb.js";
export { create, toBinary, fromBinary, toJson, fromJson, type MessageInitShape } from "@bufbuild/protobuf";
