"""How the gateway names a field in an error: a pydantic location as a JSON path.

One function for every validation error the gateway reports: scored data
(trajectory/scored_data.py), request bodies FastAPI refuses (http/errors.py) and the
OpenAI requests (generation/openai_api/protocol.py). Imports nothing but typing.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

# What pydantic puts in a location for a union member that is a plain type.
_TYPE_TAGS = frozenset({"str", "int", "float", "bool", "none", "dict", "list"})


def field_path(loc: Iterable[Any], fields_only: bool = False) -> str:
    """('tokens', 1, 3) -> 'tokens[1][3]'; (2, 'masks', 0) -> '[2].masks[0]'.

    With `fields_only`, parts that cannot be a field's name are left out: a union
    member's tag ("str", "list[int]") or a model's class name (for APIs whose fields
    are lower-case identifiers, as OpenAI's are)."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif fields_only and not _field_name(part):
            continue
        else:
            out += f".{part}" if out else str(part)
    return out


def _field_name(part: Any) -> bool:
    return isinstance(part, str) and part.isidentifier() and part not in _TYPE_TAGS and not part[0].isupper()
