"""Requests whose bytes do not decode as their method's message answer INVALID_ARGUMENT.

grpcio decodes a request before any servicer code runs; a deserializer that raises
ends the call UNKNOWN. The method handler wrapper (services/common/method_handlers.py)
gives every method handler a deserializer from `tolerant_deserializer`, which returns
an `Undecodable` in place of the message; the wrapped behaviour then refuses it with
`INVALID_ARGUMENT "request is not a valid clotho.v1.XRequest: ..."`. A streaming
request is read through `DecodedStream`, which raises `UndecodableRequest` at the bad
message and remembers it, so the call ends INVALID_ARGUMENT whatever the servicer did
with the exception.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, Callable
from typing import Any

Deserializer = Callable[[bytes], Any]


class Undecodable:
    """Stands in for a request message whose bytes did not decode."""

    __slots__ = ("message",)

    def __init__(self, message: str) -> None:
        self.message = message


class UndecodableRequest(Exception):
    """Raised to a servicer reading a request stream at a message that did not decode."""


def message_name(deserializer: Deserializer, method: str) -> str:
    """The full name of the message `deserializer` decodes (generated code passes
    `XRequest.FromString`), else the method's path."""
    owner = getattr(deserializer, "__self__", None)
    descriptor = getattr(owner, "DESCRIPTOR", None)
    name = getattr(descriptor, "full_name", None)
    return name if isinstance(name, str) else f"request of {method}"


def tolerant_deserializer(deserializer: Deserializer | None, method: str) -> Deserializer | None:
    """`deserializer`, returning an Undecodable where it raises. None (raw bytes) stays."""
    if deserializer is None:
        return None
    name = message_name(deserializer, method)

    def decode(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception as exc:  # noqa: BLE001 - any decoding failure is the client's input
            reason = str(exc) or type(exc).__name__
            return Undecodable(f"request is not a valid {name}: {reason}")

    return decode


class DecodedStream:
    """A request stream that raises UndecodableRequest at a message that did not decode;
    `failure` keeps the first such message's description."""

    def __init__(self, requests: AsyncIterable[Any]) -> None:
        self._requests = requests.__aiter__()
        self.failure: str | None = None

    def __aiter__(self) -> DecodedStream:
        return self

    async def __anext__(self) -> Any:
        if self.failure is not None:
            raise UndecodableRequest(self.failure)
        item = await self._requests.__anext__()
        if isinstance(item, Undecodable):
            self.failure = item.message
            raise UndecodableRequest(item.message)
        return item
