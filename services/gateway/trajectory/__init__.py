"""The trajectory store and batch assembly: Atropos' state (registration, queue,
per-env buffers, batches, step) held in memory, journaled to SQLite, served by both
the Atropos REST routes and GatewayService.

May import services.common, orjson, pydantic and the standard library; never
fastapi, starlette, uvicorn or grpc (an import-linter contract checks it)."""
