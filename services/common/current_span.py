"""The current span read the short way, for hot paths.

opentelemetry's API helpers (get_current_span, attach, ...) each read the current
Context again through a runtime-context object and check types through ABCs; a hot
path that only needs the current span's context reads the ContextVar behind the
default runtime context directly (`context_var`; None when another runtime context
is configured: then through the API). No SDK, no grpc: the trajectory store imports
this.
"""

from __future__ import annotations

from typing import Any

from opentelemetry import context as otel_context
from opentelemetry.trace import SpanContext
from opentelemetry.trace.propagation import _SPAN_KEY


def _context_var() -> Any:
    from opentelemetry.context.contextvars_context import ContextVarsRuntimeContext

    runtime = getattr(otel_context, "_RUNTIME_CONTEXT", None)
    if type(runtime) is ContextVarsRuntimeContext:
        return getattr(runtime, "_current_context", None)
    return None


context_var = _context_var()


def sampled_span_context() -> SpanContext | None:
    """The current span's context when it is valid and sampled (what a later span link
    can use), else None: get_current_span().get_span_context()'s checks without the
    API's layers."""
    var = context_var
    span: Any = (var.get() if var is not None else otel_context.get_current()).get(_SPAN_KEY)
    if span is None:
        return None
    ctx = span.get_span_context()
    # SpanContext is a tuple: (trace_id, span_id, is_remote, trace_flags, trace_state, is_valid).
    return ctx if ctx[5] and ctx[3] & 1 else None
