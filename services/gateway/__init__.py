"""The gateway: Atropos' trajectory API (REST, byte-compatible) and GatewayService
(gRPC) over one TrajectoryState, plus SGLang's /generate forwarded to InferenceService."""
