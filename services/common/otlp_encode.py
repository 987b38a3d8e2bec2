"""OTLP trace export requests written straight to protobuf wire bytes.

The SDK's `encode_spans` builds one protobuf object per span, attribute, value, event
and link from Python: about as much CPU per span as making the span, all of it under
the GIL of the process being traced. `encode_request` writes the same
`ExportTraceServiceRequest` (same fields, same values, same grouping by resource and
instrumentation scope) as bytes, reusing the bytes of what repeats from span to span:
the resource and scope headers, and attribute key/value pairs (a route's method, path
and status, a shard's name). tests/unit/test_otlp_encode.py checks it against
`encode_spans` field for field.

Field numbers are opentelemetry-proto's (trace/v1/trace.proto, common/v1/common.proto,
resource/v1/resource.proto, collector/trace/v1/trace_service.proto).
"""

from __future__ import annotations

import importlib
import logging
import struct
from collections.abc import Mapping, Sequence
from typing import Any

from opentelemetry.trace import SpanKind

log = logging.getLogger(__name__)

_pack_d = struct.Struct("<d").pack
_pack_q = struct.Struct("<Q").pack
_pack_i = struct.Struct("<I").pack

# SpanFlags: the context carries is_remote (0x100), and it is remote (0x200).
_FLAGS_LOCAL = b"\x85\x01" + _pack_i(0x100)  # field 16, fixed32
_FLAGS_REMOTE = b"\x85\x01" + _pack_i(0x300)
_LINK_FLAGS_LOCAL = b"\x35" + _pack_i(0x100)  # Link.flags: field 6, fixed32
_LINK_FLAGS_REMOTE = b"\x35" + _pack_i(0x300)


# SpanKind (INTERNAL=0 ...) -> Span.kind (SPAN_KIND_INTERNAL=1 ...), field 6.
_KINDS = {kind: b"\x30" + bytes((kind.value + 1,)) for kind in SpanKind}


def _varint(n: int) -> bytes:
    if n < 0x80:
        return bytes((n,))
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _ld(tag: bytes, payload: bytes) -> bytes:
    """A length-delimited field: tag, length, payload."""
    n = len(payload)
    return tag + (bytes((n,)) if n < 0x80 else _varint(n)) + payload


def _str(tag: bytes, value: str) -> bytes:
    return _ld(tag, value.encode()) if value else b""


def _any_value(value: Any) -> bytes:
    """An AnyValue message's payload (its fields are a oneof: a zero value is still
    written)."""
    if value is None:
        return b""
    if isinstance(value, bool):
        return b"\x10\x01" if value else b"\x10\x00"
    if isinstance(value, str):
        return _ld(b"\x0a", value.encode())
    if isinstance(value, int):
        return b"\x18" + _varint(value & 0xFFFFFFFFFFFFFFFF)
    if isinstance(value, float):
        return b"\x21" + _pack_d(value)
    if isinstance(value, bytes):
        return _ld(b"\x3a", value)
    if isinstance(value, Sequence):
        return _ld(b"\x2a", b"".join(_ld(b"\x0a", _any_value(v)) for v in value))
    if isinstance(value, Mapping):
        return _ld(b"\x32", b"".join(_ld(b"\x0a", _key_value(str(k), v)) for k, v in value.items()))
    raise TypeError(f"Invalid type {type(value)} of value {value}")


def _key_value(key: str, value: Any) -> bytes:
    return _str(b"\x0a", key) + _ld(b"\x12", _any_value(value))


# (key, type, value) -> the KeyValue's bytes, for scalar values; bounded.
_kv_cache: dict[tuple[str, type, Any], bytes] = {}
_KV_CACHE_MAX = 4096


def _attributes(tag: bytes, attributes: Mapping[str, Any] | None) -> bytes:
    """Each attribute as a length-delimited KeyValue field `tag`."""
    if not attributes:
        return b""
    parts = []
    cache = _kv_cache
    for key, value in attributes.items():
        kind = type(value)
        if kind is str or kind is int or kind is bool or kind is float:
            k = (key, kind, value)
            kv = cache.get(k)
            if kv is None:
                kv = _ld(tag, _key_value(key, value))
                if len(cache) < _KV_CACHE_MAX and (kind is not str or len(value) <= 64):
                    cache[k] = kv
            parts.append(kv)
            continue
        try:
            parts.append(_ld(tag, _key_value(key, value)))
        except Exception as error:  # the SDK's encoder logs and skips such an attribute too
            log.exception("Failed to encode key %s: %s", key, error)
    return b"".join(parts)


# (tag, keys, values, value types) -> the whole attribute block's bytes: a route's
# spans repeat the same attributes request after request; bounded.
_block_cache: dict[Any, bytes] = {}
_BLOCK_CACHE_MAX = 1024


def _attribute_block(tag: bytes, attributes: Mapping[str, Any]) -> bytes:
    """_attributes, cached whole when every value is hashable."""
    values = tuple(attributes.values())
    try:
        key = (tag, tuple(attributes), values, tuple(map(type, values)))
        hit = _block_cache.get(key)
    except TypeError:  # an unhashable value
        return _attributes(tag, attributes)
    if hit is None:
        hit = _attributes(tag, attributes)
        if len(_block_cache) < _BLOCK_CACHE_MAX:
            _block_cache[key] = hit
    return hit


# (name, kind) -> the Span's name and kind fields.
_name_cache: dict[tuple[str, Any], bytes] = {}


def _name_kind(name: str, kind: Any) -> bytes:
    hit = _name_cache.get((name, kind))
    if hit is None:
        hit = _str(b"\x2a", name) + _KINDS[kind]
        if len(_name_cache) < _BLOCK_CACHE_MAX:
            _name_cache[(name, kind)] = hit
    return hit


def _trace_state(state: Any) -> str:
    return ",".join(f"{k}={v}" for k, v in state.items()) if state is not None else ""


# id(scope) -> its InstrumentationScope bytes; the scopes live as long as their tracers.
_scope_cache: dict[int, tuple[Any, bytes]] = {}
_resource_cache: dict[int, tuple[Any, bytes]] = {}


def _scope_bytes(scope: Any) -> bytes:
    hit = _scope_cache.get(id(scope))
    if hit is not None and hit[0] is scope:
        return hit[1]
    if scope is None:
        payload = b""
    else:
        payload = (
            _str(b"\x0a", scope.name) + _str(b"\x12", scope.version or "") + _attributes(b"\x1a", scope.attributes)
        )
    encoded = _ld(b"\x0a", payload)
    if len(_scope_cache) < 256:
        _scope_cache[id(scope)] = (scope, encoded)
    return encoded


def _resource_bytes(resource: Any) -> bytes:
    hit = _resource_cache.get(id(resource))
    if hit is not None and hit[0] is resource:
        return hit[1]
    encoded = _ld(b"\x0a", _attributes(b"\x0a", resource.attributes))
    if len(_resource_cache) < 64:
        _resource_cache[id(resource)] = (resource, encoded)
    return encoded


def encode_span(span: Any) -> bytes:
    """One SDK ReadableSpan as the payload of an OTLP Span message.

    Reads the ReadableSpan's fields, not its properties: those copy the attributes,
    events and links into new containers, a third of the encoding's time."""
    ctx = span._context
    parent = span._parent
    out = [
        b"\x0a\x10" + ctx.trace_id.to_bytes(16, "big"),
        b"\x12\x08" + ctx.span_id.to_bytes(8, "big"),
    ]
    state = ctx.trace_state
    if state:
        out.append(_str(b"\x1a", _trace_state(state)))
    if parent:
        out.append(b"\x22\x08" + parent.span_id.to_bytes(8, "big"))
    out.append(_name_kind(span._name, span._kind))
    if span._start_time:
        out.append(b"\x39" + _pack_q(span._start_time))
    if span._end_time:
        out.append(b"\x41" + _pack_q(span._end_time))
    attributes = span._attributes
    if attributes:
        out.append(_attribute_block(b"\x4a", attributes))
        dropped = getattr(attributes, "dropped", 0)
        if dropped:
            out.append(b"\x50" + _varint(dropped))
    events = span._events
    if events:
        for event in events:
            payload = (b"\x09" + _pack_q(event.timestamp) if event.timestamp else b"") + _str(b"\x12", event.name)
            payload += _attributes(b"\x1a", event.attributes)
            if event.dropped_attributes:
                payload += b"\x20" + _varint(event.dropped_attributes)
            out.append(_ld(b"\x5a", payload))
        dropped = getattr(events, "dropped", 0)
        if dropped:
            out.append(b"\x60" + _varint(dropped))
    links = span._links
    if links:
        for link in links:
            lc = link.context
            payload = b"\x0a\x10" + lc.trace_id.to_bytes(16, "big") + b"\x12\x08" + lc.span_id.to_bytes(8, "big")
            payload += _attributes(b"\x22", link.attributes)
            if link.dropped_attributes:
                payload += b"\x28" + _varint(link.dropped_attributes)
            payload += _LINK_FLAGS_REMOTE if lc.is_remote else _LINK_FLAGS_LOCAL
            out.append(_ld(b"\x6a", payload))
        dropped = getattr(links, "dropped", 0)
        if dropped:
            out.append(b"\x70" + _varint(dropped))
    status = span._status
    if status is not None:
        code = status.status_code.value
        if code or status.description:
            out.append(
                _ld(b"\x7a", _str(b"\x12", status.description or "") + (b"\x18" + bytes((code,)) if code else b""))
            )
        else:
            out.append(b"\x7a\x00")
    out.append(_FLAGS_REMOTE if parent is not None and parent.is_remote else _FLAGS_LOCAL)
    return b"".join(out)


_ids = struct.Struct(">HQQHQ").pack  # Span.trace_id (two halves) and span_id, with their tags
_parent_id = struct.Struct(">HQ").pack  # Span.parent_span_id with its tag
_times = struct.Struct("<BQBQ").pack  # start and end time, with their tags
_M64 = (1 << 64) - 1

# A ServerSpan's (name, kind, status, parent's remoteness, attribute items and their
# types) -> (name and kind bytes, attributes + status + flags bytes): a route's spans
# differ only in ids and times; bounded.
_server_cache: dict[tuple[Any, ...], tuple[bytes, bytes]] = {}


def _server_parts(span: Any, key: tuple[Any, ...]) -> tuple[bytes, bytes]:
    name_kind = _name_kind(span._name, span._kind)
    status = span._status
    code = status.status_code.value
    if code or status.description:
        status_bytes = _ld(
            b"\x7a", _str(b"\x12", status.description or "") + (b"\x18" + bytes((code,)) if code else b"")
        )
    else:
        status_bytes = b"\x7a\x00"
    parent = span._parent
    flags = _FLAGS_REMOTE if parent is not None and parent.is_remote else _FLAGS_LOCAL
    parts = (name_kind, _attributes(b"\x4a", span._attributes) + status_bytes + flags)
    if len(_server_cache) < _BLOCK_CACHE_MAX:
        _server_cache[key] = parts
    return parts


def encode_server_span(span: Any) -> bytes:
    """A services.common.server_span.ServerSpan as a length-delimited Span field (tag
    2 of ScopeSpans): what encode_span writes, from a per-route template (the
    fields that repeat) around its ids and times. Events, links or a trace state
    take encode_span's way."""
    ctx = span._context
    if span._events or span._links or ctx[4] or not span._end_time or not span._start_time:
        return _ld(b"\x12", encode_span(span))
    attributes = span._attributes
    parent = span._parent
    status = span._status
    key = (
        span._name,
        span._kind,
        status.status_code,
        status.description,
        parent is not None and parent[2],
        *attributes.items(),
        *map(type, attributes.values()),
    )
    try:
        parts = _server_cache.get(key) or _server_parts(span, key)
    except TypeError:  # an unhashable attribute value
        return _ld(b"\x12", encode_span(span))
    trace_id = ctx[0]
    body = _ids(0x0A10, trace_id >> 64, trace_id & _M64, 0x1208, ctx[1])
    if parent is not None:
        body += _parent_id(0x2208, parent[1])
    body += parts[0] + _times(0x39, span._start_time, 0x41, span._end_time) + parts[1]
    n = len(body)
    return (b"\x12" + bytes((n,)) if n < 0x80 else b"\x12" + _varint(n)) + body


def _span_field(span: Any) -> bytes:
    return _ld(b"\x12", encode_span(span))


try:  # the C encoder of ServerSpan runs (_otlp_fast.c), built by `pip install`
    _fast: Any = importlib.import_module("services.common._otlp_fast")
    _encode_server_spans: Any = _fast.encode_server_spans
    _common_recorder: Any = _fast.common_recorder
    # A span the gateway wrote as its bytes when it ended (request_span.http_spans).
    _EncodedSpan: Any = _fast.EncodedSpan
except ImportError:  # no compiler at install: the same bytes from Python
    _encode_server_spans = _common_recorder = None
    _EncodedSpan = type(None)


def _server_run(spans: list[Any]) -> bytes:
    """Consecutive ServerSpans' Span fields: encode_server_span's bytes, from C when
    the extension is built."""
    if _encode_server_spans is not None:
        return bytes(_encode_server_spans(spans, _server_cache, _server_parts, _span_field))
    return b"".join(map(encode_server_span, spans))


def _group(index: dict[int, Any], entries: list[Any], key: Any) -> Any:
    """The entry for `key` (by identity, else by equality, as the SDK groups)."""
    entry = index.get(id(key))
    if entry is None:
        entry = next((e for e in entries if e[0] == key), None)
        if entry is None:
            entry = (key, [], {})
            entries.append(entry)
        index[id(key)] = entry
    return entry


# type -> whether its spans are ServerSpans (or EncodedSpans): isinstance against
# ServerSpan is an ABC check (trace.Span), a few microseconds a span.
_server_types: dict[type, bool] = {}


def encode_request(spans: Sequence[Any]) -> bytes:
    """An ExportTraceServiceRequest holding `spans` (ReadableSpans), grouped by
    resource, then instrumentation scope, in first-seen order like the SDK's."""
    from services.common.server_span import ServerSpan

    if (
        _encode_server_spans is not None
        and type(spans) is list
        and spans
        and (isinstance(spans[0], ServerSpan) or type(spans[0]) is _EncodedSpan)
        and (recorder := _common_recorder(spans)) is not None
    ):
        # The usual batch: ServerSpans of one recorder (one resource, one scope), all
        # in one run, nothing done per span in Python.
        scope = recorder.scope or None
        resource = recorder.resource
        schema = scope.schema_url if scope is not None else ""
        # The spans' bytes are most of the request: copied once, by the join.
        scope_parts = [_scope_bytes(scope), _server_run(spans), _str(b"\x1a", schema or "")]
        scope_len = sum(map(len, scope_parts))
        resource_parts = [_resource_bytes(resource), b"\x12" + _varint(scope_len), *scope_parts]
        resource_parts.append(_str(b"\x1a", resource.schema_url))
        return b"".join([b"\x0a" + _varint(sum(map(len, resource_parts))), *resource_parts])
    resources: list[Any] = []  # (resource, [(scope, [span bytes], {})], {id(scope): entry})
    by_id: dict[int, Any] = {}
    # A ServerSpan's recorder -> its scope's entry (the recorder holds one resource
    # and scope).
    by_recorder: dict[int, Any] = {}
    run: list[Any] | None = None  # the run the last span joined, while the next may
    run_recorder: Any = None
    server_types = _server_types
    for span in spans:
        kind = type(span)
        is_server = server_types.get(kind)
        if is_server is None:
            is_server = server_types[kind] = kind is _EncodedSpan or issubclass(kind, ServerSpan)
        if is_server:
            recorder = span._recorder
            if recorder is run_recorder and run is not None:  # the usual batch: one long run
                run.append(span)
                continue
            scope = by_recorder.get(id(recorder))
            if scope is None:
                res = _group(by_id, resources, recorder.resource)
                scope = by_recorder[id(recorder)] = _group(res[2], res[1], recorder.scope or None)
            # Consecutive ServerSpans of a scope gather in a list, encoded as one run.
            encoded = scope[1]
            if encoded and type(encoded[-1]) is list:
                run = encoded[-1]
                run.append(span)
            else:
                run = [span]
                encoded.append(run)
            run_recorder = recorder
            continue
        run = run_recorder = None  # its bytes may follow the run in the same scope
        res = _group(by_id, resources, span.resource)
        scope = _group(res[2], res[1], span.instrumentation_scope or None)
        scope[1].append(_ld(b"\x12", encode_span(span)))
    out = []
    for resource, scopes, _ in resources:
        scope_spans = []
        for scope, encoded, _ in scopes:
            schema = scope.schema_url if scope is not None else ""
            body = b"".join(_server_run(part) if type(part) is list else part for part in encoded)
            scope_spans.append(_ld(b"\x12", _scope_bytes(scope) + body + _str(b"\x1a", schema or "")))
        out.append(_ld(b"\x0a", _resource_bytes(resource) + b"".join(scope_spans) + _str(b"\x1a", resource.schema_url)))
    return b"".join(out)
