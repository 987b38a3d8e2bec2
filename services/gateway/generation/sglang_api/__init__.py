"""SGLang's HTTP dialect: /generate, /health and /get_model_info (api_router.py),
the /generate request and reply (protocol.py) and the serving of a call: prompt
encoding, rendering and streaming (serving.py). /generate also hands vLLM-shaped
bodies to vllm_api/."""
