"""The OpenAI routes /v1/models, /v1/completions and /v1/chat/completions: the routes
(api_router.py), OpenAI's error shape (error_shape.py), request schema and
validation (protocol.py), rendering of choices, logprobs and stop strings
(render.py) and the serving of a call, whole or streamed (serving.py)."""
