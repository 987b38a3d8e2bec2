"""Gzip for `/batch` replies, compressed ahead of the request that takes them.

Compressing a batch (hundreds of KB) is the largest server-side cost of a `/batch`
reply. Batches formed by an earlier call are handed out later in a known order, so
while the trainer decodes one batch the next is compressed in a worker thread (zlib
gives the GIL up while it deflates), and the call that takes it finds the bytes ready.

The compression still happens inside Starlette's GZipMiddleware (subclassed here), so
a compressed reply's headers stay exactly what they were; a body prepared ahead is
compressed with the middleware's own settings, so its bytes are the same too.

Whether to compress at all (`response_gzip`): Atropos compresses every reply the
client accepts gzip for. Over loopback that only costs CPU on both ends: a trainer
inflating a 260 KB batch spends ~0.6 ms, the gateway ~1.3 ms deflating it, to save a
copy through the kernel that costs less than either. "auto" (the default) therefore
compresses for clients on other hosts only; "always" is Atropos' behaviour, "never"
suits a private network fast enough that the bytes do not matter.
"""

from __future__ import annotations

import asyncio
import collections
import ipaddress
import zlib
from typing import Any, Literal

from starlette.middleware.gzip import GZipMiddleware, GZipResponder, IdentityResponder
from starlette.types import Receive, Scope, Send

# Prepared bodies kept at most: the one being sent and the next.
KEPT = 2

# GZipMiddleware's default: bodies from this size on are deflated in a worker thread.
THREAD_MINIMUM_SIZE = 128 * 1024

ResponseGzip = Literal["auto", "always", "never"]
RESPONSE_GZIP_CHOICES = ("auto", "always", "never")


def is_loopback(scope: Scope) -> bool:
    """The client connected over loopback (127.0.0.0/8, ::1)."""
    client = scope.get("client")
    if not client:
        return False
    host = client[0]
    if host.startswith("127.") or host == "::1":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def wants_gzip(scope: Scope, policy: ResponseGzip) -> bool:
    """Whether a reply to this request is compressed: the client accepts gzip (the
    middleware's substring test of Accept-Encoding) and the policy allows it."""
    if policy == "never" or (policy == "auto" and is_loopback(scope)):
        return False
    return "gzip" in _header(scope, b"accept-encoding")


class BatchCompressor:
    """Compresses reply bodies ahead in a worker thread and hands the result to the
    middleware when that very body is sent."""

    def __init__(self, compresslevel: int = 1, minimum_size: int = 1000, policy: ResponseGzip = "auto") -> None:
        if policy not in RESPONSE_GZIP_CHOICES:
            raise ValueError(f"response_gzip must be one of {RESPONSE_GZIP_CHOICES}, not {policy!r}")
        self.compresslevel = compresslevel
        self.minimum_size = minimum_size
        self.policy: ResponseGzip = policy
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

    async def compressed(self, body: bytes) -> bytes:
        """`body` gzipped: the prepared bytes if there are some, else compressed now
        (in a worker thread when large, as the middleware does)."""
        future = self.take(body)
        if future is not None:
            return await future
        if len(body) >= THREAD_MINIMUM_SIZE:
            return await asyncio.get_running_loop().run_in_executor(None, self.gzip, body)
        return self.gzip(body)

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
        if wants_gzip(scope, self.batch_compressor.policy):
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
