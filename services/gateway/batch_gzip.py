"""Gzip for `/batch` replies, compressed ahead of the request that takes them.

Compressing a batch (hundreds of KB) is the largest server-side cost of a `/batch`
reply. Batches formed by an earlier call are handed out later in a known order, so
while the trainer decodes one batch the next is compressed in a worker thread (zlib
gives the GIL up while it deflates), and the call that takes it finds the bytes ready.

The compression still happens inside Starlette's GZipMiddleware (subclassed here), so
whether a reply is compressed and its headers stay exactly what they were; a body
prepared ahead is compressed with the middleware's own settings, so its bytes are
the same too.
"""

from __future__ import annotations

import asyncio
import collections
import zlib
from typing import Any

from starlette.middleware.gzip import GZipMiddleware, GZipResponder, IdentityResponder
from starlette.types import Receive, Scope, Send

# Prepared bodies kept at most: the one being sent and the next.
KEPT = 2


class BatchCompressor:
    """Compresses reply bodies ahead in a worker thread and hands the result to the
    middleware when that very body is sent."""

    def __init__(self, compresslevel: int = 1, minimum_size: int = 1000) -> None:
        self.compresslevel = compresslevel
        self.minimum_size = minimum_size
        self._prepared: collections.deque[tuple[bytes, asyncio.Future[bytes]]] = collections.deque(maxlen=KEPT)

    def gzip(self, body: bytes) -> bytes:
        # What GZipResponder does for a whole body.
        compressor = zlib.compressobj(self.compresslevel, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
        return compressor.compress(body) + compressor.flush()

    def prepare(self, body: bytes) -> None:
        """Start compressing `body`, a reply likely sent soon."""
        if len(body) < self.minimum_size:
            return
        future = asyncio.get_running_loop().run_in_executor(None, self.gzip, body)
        self._prepared.append((body, future))

    def take(self, body: bytes) -> asyncio.Future[bytes] | None:
        """The compression of `body` if it was prepared (and forget it), else None."""
        for i, (prepared, future) in enumerate(self._prepared):
            if prepared is body or prepared == body:
                del self._prepared[i]
                return future
        return None


class _PrecompressedResponder(GZipResponder):
    def __init__(self, app: Any, minimum_size: int, compressor: BatchCompressor, **kwargs: Any) -> None:
        super().__init__(app, minimum_size, **kwargs)
        self.batch_compressor = compressor

    async def apply_compression(self, body: bytes, *, more_body: bool) -> bytes:
        if not more_body:
            future = self.batch_compressor.take(body)
            if future is not None:
                return await future
        return await super().apply_compression(body, more_body=more_body)


class PrecompressedGZipMiddleware(GZipMiddleware):
    """GZipMiddleware that uses the compressor's prepared bytes for a body it has."""

    def __init__(self, app: Any, compressor: BatchCompressor, **kwargs: Any) -> None:
        super().__init__(app, minimum_size=compressor.minimum_size, compresslevel=compressor.compresslevel, **kwargs)
        self.batch_compressor = compressor

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":  # pragma: no cover - the parent's rule
            await self.app(scope, receive, send)
            return
        responder: Any
        if "gzip" in _header(scope, b"accept-encoding"):
            responder = _PrecompressedResponder(
                self.app,
                self.minimum_size,
                self.batch_compressor,
                compresslevel=self.compresslevel,
                thread_minimum_size=self.thread_minimum_size,
                exclude_content_types=self.exclude_content_types,
            )
        else:
            responder = IdentityResponder(self.app, self.minimum_size, exclude_content_types=self.exclude_content_types)
        await responder(scope, receive, send)


def _header(scope: Scope, name: bytes) -> str:
    # Starlette's Headers(scope).get(): the first value, case-insensitive.
    for key, value in scope.get("headers", []):
        if key.lower() == name:
            return value.decode("latin-1")
    return ""


def accepts_gzip(headers: Any) -> bool:
    """The middleware's test (a substring of Accept-Encoding)."""
    return "gzip" in headers.get("accept-encoding", "")
