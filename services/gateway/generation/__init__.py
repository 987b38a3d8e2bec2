"""The gateway's inference front door: the pool of InferenceService targets
(pool.py: routed calls, failover, model info, the tokenizer; routing.py: health
watching and least-loaded choice), the sampling fields the /generate dialects share
(json_fields.py) and one folder per HTTP dialect, each holding its route, request
schema and serving logic side by side: sglang_api/ (/generate, /health,
/get_model_info), vllm_api/ (vLLM's /generate body) and openai_api/ (/v1/models,
/v1/completions, /v1/chat/completions).

May import services.common, services.gateway.http (errors, SSE, request span),
services.gateway.trajectory.receipts (to record which policy version served a
completion) and the generated stubs; never the trajectory state or store."""
