"""The gateway's shared HTTP plumbing: the app factory (app.py), the request-body
middleware and its fast ingest entry (body.py), the one gRPC-code -> HTTP table and
JSON error bodies (errors.py), server-sent events (sse.py), the request span that
continues a caller's trace (request_span.py) and Prometheus /metrics (metrics.py).

May import services.common, the web stack (FastAPI/Starlette) and grpc's status
codes. errors.py, sse.py and request_span.py import nothing of the trajectory state,
so the inference routes that use them do not load the store."""
