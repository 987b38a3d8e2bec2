"""JSON no route can take, found once for every route: nesting deeper than
MAX_JSON_DEPTH levels, and text that cannot be encoded (a lone UTF-16 surrogate such
as `"\\ud800"`, which JSON's escapes can spell but UTF-8, tokenizers and the store
cannot hold).

`body_problem(body)` names the field and what is wrong, or None. It costs two byte
counts and one byte search for an ordinary body; the exact checks run only when those
say a body may nest that deep or may hold a surrogate escape. RequestBodyMiddleware
(body.py) asks it before a route reads a body, and on the error path of the ingest
fast routes (whose own parser refuses such bodies without naming the field).
"""

from __future__ import annotations

import json
import re
from typing import Any

from services.gateway.field_paths import field_path

# Deeper than any request the gateway serves nests (chat messages with content parts
# and tool schemas stay well within it), shallower than any parser here recurses.
MAX_JSON_DEPTH = 128

# A \uD800-\uDFFF escape: the only way a JSON text's strings can hold a surrogate
# (surrogates encoded as UTF-8 bytes fail decoding).
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")
_SURROGATE = re.compile("[\ud800-\udfff]")
# JSON's structural tokens, strings skipped whole.
_TOKEN = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"|[\[\]{},:]')
# How many parts of a path an error spells out before "...".
_PATH_PARTS = 6


def body_problem(body: bytes) -> tuple[str, str] | None:
    """(field, message) for a body nested deeper than MAX_JSON_DEPTH or holding a lone
    surrogate; None for anything else (including bodies that are not JSON: the route
    answers those)."""
    if body.count(b"[") + body.count(b"{") > MAX_JSON_DEPTH:
        deep = too_deep(body)
        if deep is not None:
            return deep
    if _SURROGATE_ESCAPE.search(body) is not None:
        return lone_surrogate(body)
    return None


def _readable(text: str) -> str:
    """`text` with any surrogate spelled as an escape, so an answer can carry it."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _name(loc: list[Any]) -> str:
    shown = field_path(loc[:_PATH_PARTS]) or "body"
    return _readable(shown + ("..." if len(loc) > _PATH_PARTS else ""))


def too_deep(body: bytes) -> tuple[str, str] | None:
    """Where `body` first nests deeper than MAX_JSON_DEPTH, reading only its structural
    tokens; None when it does not."""
    # One entry per open container: [is_object, key or index, expecting a key].
    stack: list[list[Any]] = []
    for match in _TOKEN.finditer(body):
        token = match.group()
        if token in (b"[", b"{"):
            stack.append([token == b"{", 0, True])
            if len(stack) > MAX_JSON_DEPTH:
                loc = [entry[1] for entry in stack[:-1]]
                return _name(loc), f"{_name(loc)}: JSON nested deeper than {MAX_JSON_DEPTH} levels"
        elif token in (b"]", b"}"):
            if stack:
                stack.pop()
        elif not stack:
            continue
        elif token == b",":
            top = stack[-1]
            if top[0]:
                top[2] = True
            else:
                top[1] += 1
        elif token == b":":
            stack[-1][2] = False
        elif stack[-1][0] and stack[-1][2]:  # an object's key
            try:
                stack[-1][1] = json.loads(token)
            except ValueError:
                stack[-1][1] = token.decode("utf-8", "replace")
    return None


def lone_surrogate(body: bytes) -> tuple[str, str] | None:
    """The first string (key or value) of `body` holding a lone surrogate; None when
    there is none or the body is not JSON."""
    try:
        value = json.loads(body)
    except (ValueError, RecursionError):
        return None
    pending: list[tuple[list[Any], Any]] = [([], value)]
    while pending:
        loc, item = pending.pop()
        if isinstance(item, dict):
            for key, child in reversed(list(item.items())):
                if _SURROGATE.search(key) is not None:
                    return _surrogate_answer([*loc, key], key, "a key")
                pending.append(([*loc, key], child))
        elif isinstance(item, list):
            pending.extend(([*loc, i], child) for i, child in reversed(list(enumerate(item))))
        elif isinstance(item, str) and _SURROGATE.search(item) is not None:
            return _surrogate_answer(loc, item, "text")
    return None


def _surrogate_answer(loc: list[Any], text: str, what: str) -> tuple[str, str]:
    found = _SURROGATE.search(text)
    assert found is not None
    name = _name(loc)
    code = f"\\u{ord(found.group()):04x}"
    return name, (
        f"{name}: {what} holds a lone UTF-16 surrogate ({code} at character {found.start()}), "
        "which cannot be encoded as UTF-8"
    )
