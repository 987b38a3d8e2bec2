"""The one dtype table of weight transfer: each dtype a tensor may travel in, with its
proto enum (manifests), its name (settings, the engine's --dtype, SGLang's HTTP API)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from clotho.v1 import inference_service_pb2 as pb


@dataclass(frozen=True)
class WireDtype:
    torch: torch.dtype
    proto: pb.DType
    name: str


WIRE_DTYPES: tuple[WireDtype, ...] = (
    WireDtype(torch.float32, pb.D_TYPE_FLOAT32, "float32"),
    WireDtype(torch.bfloat16, pb.D_TYPE_BFLOAT16, "bfloat16"),
    WireDtype(torch.float16, pb.D_TYPE_FLOAT16, "float16"),
)
_BY_TORCH = {d.torch: d for d in WIRE_DTYPES}
_BY_PROTO: dict[int, WireDtype] = {d.proto: d for d in WIRE_DTYPES}
_BY_NAME = {d.name: d for d in WIRE_DTYPES}


def transferable(dtype: torch.dtype) -> bool:
    return dtype in _BY_TORCH


def proto_of(dtype: torch.dtype) -> pb.DType:
    """The manifest enum of a transferable dtype (KeyError otherwise)."""
    return _BY_TORCH[dtype].proto


def name_of(dtype: torch.dtype) -> str:
    """ "float32", "bfloat16" or "float16" (KeyError for other dtypes)."""
    return _BY_TORCH[dtype].name


def from_proto(value: int) -> torch.dtype | None:
    """The torch dtype of a manifest enum; None for an unsupported one."""
    entry = _BY_PROTO.get(value)
    return entry.torch if entry is not None else None


def from_name(name: str) -> torch.dtype | None:
    """The torch dtype of a name; None for any other name (e.g. "" for "each tensor's own")."""
    entry = _BY_NAME.get(name)
    return entry.torch if entry is not None else None
