"""The OTLP/gRPC export of services.common.telemetry's exporter, sent from an event loop.

A service whose requests run on an asyncio loop (the gateway, the inference server)
exports its spans from that loop (services.common.span_sink's SpanSink.run_on_loop):
no exporter thread runs beside the requests, taking the GIL from them at every export
cycle, which was most of what exporting cost a busy gateway (bench/tracing_inprocess.py).
`AioExport` sends a batch as the SDK's OTLPSpanExporter would, with the settings it
read from the OTEL_* variables (endpoint, TLS credentials, headers, compression,
timeout, channel options, the retryable status codes) and its retry policy: up to six
tries within the timeout, backing off 1, 2, 4 ... s (+-20%) or as the collector's
RetryInfo says, the channel remade after the first UNAVAILABLE. The request is the
exporter's own (`_translate_data`: otlp_encode's bytes); the channel is made on the
loop at the first export.
"""

from __future__ import annotations

import asyncio
import logging
import random
from typing import Any

import grpc
from grpc import aio
from opentelemetry.exporter.otlp.proto.grpc import exporter as sdk_exporter

from services.common.telemetry import _RawTraceStub

log = logging.getLogger(__name__)
# The SDK exporter's tries per batch (its _MAX_RETRYS; None in a release without it,
# whose export then stays on the thread: see `supports`).
MAX_TRIES: int | None = getattr(sdk_exporter, "_MAX_RETRYS", None)
# What the exporter must hold for its export to be sent from a loop: the settings the
# SDK's OTLP/gRPC exporter read from OTEL_* (and its retryable codes and exporter
# metrics, as opentelemetry-exporter-otlp-proto-grpc keeps them).
NEEDED = (
    "_endpoint",
    "_insecure",
    "_credentials",
    "_headers",
    "_timeout",
    "_compression",
    "_channel_options",
    "_retryable_error_codes",
    "_metrics",
    "_shutdown",
)


def supports(exporter: Any) -> bool:
    """Whether `exporter` keeps the settings AioExport sends with (an SDK release that
    keeps them elsewhere keeps its export on the exporter thread)."""
    return MAX_TRIES is not None and all(hasattr(exporter, name) for name in NEEDED)


class AioExport:
    """`await export(batch)` sends `batch` (what the SpanSink takes) through `exporter`'s
    settings over a grpc.aio channel of the running loop."""

    def __init__(self, exporter: Any) -> None:
        assert MAX_TRIES is not None, "made only where supports() holds"
        self.exporter = exporter
        self._tries = MAX_TRIES
        self._channel: aio.Channel | None = None
        self._call: Any = None

    def _connect(self) -> None:
        e = self.exporter
        options = list(e._channel_options)
        if e._insecure:
            self._channel = aio.insecure_channel(e._endpoint, options=options, compression=e._compression)
        else:
            self._channel = aio.secure_channel(e._endpoint, e._credentials, options=options, compression=e._compression)
        self._call = _RawTraceStub(self._channel).Export

    async def export(self, batch: list[Any]) -> bool:
        """Send `batch`; True once the collector took it, False when it failed for good
        (logged, as the SDK logs it)."""
        e = self.exporter
        if e._shutdown:
            return False
        loop = asyncio.get_running_loop()
        with e._metrics.export_operation(e._count_data(batch)) as result:
            request = e._translate_data(batch)
            deadline = loop.time() + e._timeout
            for attempt in range(self._tries):
                if self._call is None:
                    self._connect()
                try:
                    await self._call(request, metadata=e._headers, timeout=max(0.0, deadline - loop.time()))
                    return True
                except aio.AioRpcError as error:
                    code = error.code()
                    backoff = 2**attempt * random.uniform(0.8, 1.2)
                    retry_info = dict(error.trailing_metadata() or ()).get("google.rpc.retryinfo-bin")
                    if retry_info is not None:
                        from google.rpc.error_details_pb2 import RetryInfo  # type: ignore[import-untyped]

                        info = RetryInfo.FromString(retry_info)
                        backoff = info.retry_delay.seconds + info.retry_delay.nanos / 1e9
                    if code == grpc.StatusCode.UNAVAILABLE and attempt == 0:
                        await self.close()  # reconnect on the next try
                    if (
                        code not in e._retryable_error_codes
                        or attempt + 1 == self._tries
                        or backoff > deadline - loop.time()
                        or e._shutdown
                    ):
                        log.error(
                            "Failed to export spans to %s, error code: %s, error details: %s",
                            e._endpoint,
                            code,
                            error.details(),
                        )
                        result.error = error
                        result.error_attrs = {"rpc.response.status_code": code.name}
                        return False
                    log.warning(
                        "Transient error %s encountered while exporting spans to %s, retrying in %.2fs.",
                        code,
                        e._endpoint,
                        backoff,
                    )
                await asyncio.sleep(backoff)
            return False

    async def close(self) -> None:
        channel, self._channel, self._call = self._channel, None, None
        if channel is not None:
            await channel.close()
