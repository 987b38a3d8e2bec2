"""Server-sent events: one `data:` event per JSON payload."""

from __future__ import annotations

import json
from typing import Any

# The event that ends an OpenAI stream.
DONE = b"data: [DONE]\n\n"


def sse_event(payload: Any, ensure_ascii: bool = False) -> bytes:
    """`payload` as one event. `ensure_ascii` escapes non-ASCII text (SGLang's
    /generate stream does; the OpenAI streams send UTF-8)."""
    return b"data: " + json.dumps(payload, ensure_ascii=ensure_ascii).encode() + b"\n\n"
