"""Buckets as bytes: packing tensors into a bucket (checksummed as it is written),
sending a bucket straight from tensors already laid out as it, unpacking views, CRC-32."""

from __future__ import annotations

import zlib
from collections.abc import Iterator, Mapping

import torch

from services.common.weight_wire.manifest import Manifest

try:
    # ISA-L computes the same CRC-32 as zlib ten times faster (carry-less multiply), so
    # checksumming a bucket costs a fraction of sending it; zlib is the fallback.
    from isal.isal_zlib import crc32 as _crc32
except ImportError:  # pragma: no cover - isal ships wheels for the usual platforms
    _crc32 = zlib.crc32


def pack_bucket(
    manifest: Manifest, index: int, tensors: Mapping[str, torch.Tensor], out: torch.Tensor | None = None
) -> torch.Tensor:
    """Copy the bucket's tensors into one flat buffer (reusing `out` when given)."""
    bucket = manifest.buckets[index]
    if out is None or out.numel() != bucket.numel or out.dtype != bucket.dtype:
        device = next(iter(tensors.values())).device if tensors else None
        out = torch.empty(bucket.numel, dtype=bucket.dtype, device=device)
    for t in manifest.tensors_in(index):
        src = tensors[t.name].detach()
        out[t.offset : t.offset + t.numel].copy_(src.reshape(-1))
    return out


# Packing copies this much at a time and checksums it while it is still in the CPU's
# cache: the checksum then costs no second pass over memory.
PACK_CHUNK_BYTES = 1 << 20


def pack_bucket_crc32(manifest: Manifest, index: int, tensors: Mapping[str, torch.Tensor], out: torch.Tensor) -> int:
    """pack_bucket into `out` (a CPU tensor of the bucket's size and dtype) and return
    the CRC-32 of the packed bytes, computed chunk by chunk as they are written."""
    bucket = manifest.buckets[index]
    if out.numel() != bucket.numel or out.dtype != bucket.dtype or out.device.type != "cpu":
        raise ValueError("out must be a CPU tensor of the bucket's size and dtype")
    step = max(PACK_CHUNK_BYTES // out.element_size(), 1)
    raw = out.view(torch.uint8).numpy()
    size = out.element_size()
    crc = 0
    cursor = 0  # elements of `out` checksummed so far
    for t in manifest.tensors_in(index):
        if t.offset != cursor:  # a gap the manifest leaves: checksum it as it is
            out[cursor : t.offset].zero_()
            crc = _crc32(raw[cursor * size : t.offset * size].data, crc)
        src = tensors[t.name].detach().reshape(-1)
        for start in range(0, t.numel, step):
            stop = min(start + step, t.numel)
            out[t.offset + start : t.offset + stop].copy_(src[start:stop])
            crc = _crc32(raw[(t.offset + start) * size : (t.offset + stop) * size].data, crc)
        cursor = t.offset + t.numel
    if cursor != bucket.numel:
        out[cursor:].zero_()
        crc = _crc32(raw[cursor * size :].data, crc)
    return crc & 0xFFFFFFFF


def bucket_view(manifest: Manifest, index: int, tensors: Mapping[str, torch.Tensor]) -> torch.Tensor | None:
    """The bucket as a flat view of memory the tensors already share, when they lie in one
    storage exactly as the manifest lays them out (same dtype, contiguous, in order):
    then it can be sent without packing. None otherwise."""
    entries = manifest.tensors_in(index)
    bucket = manifest.buckets[index]
    if not entries:
        return None
    first = tensors[entries[0].name]
    storage = first.untyped_storage()
    base = first.data_ptr() - entries[0].offset * first.element_size()
    for t in entries:
        src = tensors[t.name]
        if (
            src.dtype != bucket.dtype
            or not src.is_contiguous()
            or src.untyped_storage().data_ptr() != storage.data_ptr()
            or src.data_ptr() != base + t.offset * src.element_size()
        ):
            return None
    start = (base - storage.data_ptr()) // first.element_size()
    if start < 0 or (start + bucket.numel) * first.element_size() > storage.nbytes():
        return None
    flat = torch.empty(0, dtype=bucket.dtype, device=first.device)
    flat.set_(storage, start, (bucket.numel,), (1,))
    return flat


def flat_buckets(manifest: Manifest, device: torch.device | str = "cpu") -> list[torch.Tensor]:
    """One empty flat tensor per bucket of the manifest."""
    return [torch.empty(b.numel, dtype=b.dtype, device=device) for b in manifest.buckets]


def lay_out_parameters(model: torch.nn.Module, manifest: Manifest) -> list[torch.Tensor]:
    """Move the model's parameters into the manifest's buckets: each parameter becomes a
    view of its bucket's flat buffer (values unchanged), so `bucket_view` finds every
    bucket already packed and a sender sends straight from the parameters. Returns the
    buffers. Only for a manifest whose dtypes are the parameters' own."""
    params = dict(model.named_parameters())
    device = next(iter(params.values())).device
    flats = flat_buckets(manifest, device)
    with torch.no_grad():
        for i, flat in enumerate(flats):
            for name, view in unpack_bucket(manifest, i, flat):
                p = params[name]
                if p.dtype != view.dtype:
                    raise ValueError(f"{name}: parameter dtype {p.dtype} is not the manifest's {view.dtype}")
                view.copy_(p)
                p.data = view
    return flats


def unpack_bucket(manifest: Manifest, index: int, flat: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
    """Views of the bucket's tensors inside `flat` (no copy)."""
    for t in manifest.tensors_in(index):
        yield t.name, flat[t.offset : t.offset + t.numel].view(t.shape)


def crc32_extend(data: memoryview, crc: int = 0) -> int:
    """Continue a CRC-32 over more bytes (crc32 of a whole = crc32_extend of its parts in
    order); releases the GIL."""
    return _crc32(data, crc) & 0xFFFFFFFF


def crc32(flat: torch.Tensor) -> int:
    """CRC-32 (zlib's polynomial) of a tensor's bytes; releases the GIL, so it overlaps
    with a collective running in another thread."""
    data = flat.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy()
    return _crc32(data.data) & 0xFFFFFFFF
