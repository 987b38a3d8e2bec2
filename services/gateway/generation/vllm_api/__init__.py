"""vLLM's /generate dialect (the body Atropos' VLLMServer sends): the request and
reply (protocol.py) and the serving of a call (serving.py). Its route is SGLang's
/generate (sglang_api/api_router.py), which hands it bodies `is_vllm_body` accepts."""
