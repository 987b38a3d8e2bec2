"""The current span read the short way, for hot paths.

opentelemetry's API helpers (get_current_span, attach, ...) each read the current
Context again through a runtime-context object and check types through ABCs; a hot
path that only needs the current span reads the ContextVar behind the
default runtime context directly (`context_var`; None when another runtime context
is configured: then through the API). No SDK, no grpc: the trajectory store imports
this.
"""

from __future__ import annotations

from typing import Any

from opentelemetry import context as otel_context
from opentelemetry.trace.propagation import _SPAN_KEY


def _context_var() -> Any:
    from opentelemetry.context.contextvars_context import ContextVarsRuntimeContext

    runtime = getattr(otel_context, "_RUNTIME_CONTEXT", None)
    if type(runtime) is ContextVarsRuntimeContext:
        return getattr(runtime, "_current_context", None)
    return None


context_var = _context_var()


def current_context() -> otel_context.Context:
    """The current Context: get_current() without the API's layers."""
    var = context_var
    return var.get() if var is not None else otel_context.get_current()


def current_span() -> Any:
    """The current span, or None: get_current_span() without the API's layers (and
    without its INVALID_SPAN stand-in)."""
    return current_context().get(_SPAN_KEY)
