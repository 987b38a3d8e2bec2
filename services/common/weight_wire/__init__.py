"""The weight-transfer wire format shared by the trainer (sender) and inference (receiver).

An update is a manifest of tensors packed into flat, single-dtype buckets. The sender
packs each bucket, checksums it and broadcasts it as one collective; the receiver
receives into a staging buffer of the same size and checks the CRC32 the sender
reports afterwards. Tensors keep their Hugging Face names.

  dtypes      the one dtype table (torch dtype, proto enum, name)
  manifest    TensorEntry, BucketEntry, Manifest, build_manifest
  packing     pack/unpack, buckets sent in place, CRC-32
  collective  CollectiveGroup and the backend names
  pipeline    the pipelined send and receive loops and their threads
  shm         the same-host transport: buckets in a shared-memory segment
  cuda_ipc    the same transport's sets in the trainer's GPU memory (CUDA IPC handles)
"""

from services.common.weight_wire.collective import BACKEND_NAMES, BACKENDS, CollectiveGroup
from services.common.weight_wire.manifest import (
    DEFAULT_BUCKET_BYTES,
    BucketEntry,
    Manifest,
    TensorEntry,
    build_manifest,
)
from services.common.weight_wire.packing import (
    bucket_view,
    crc32,
    flat_buckets,
    lay_out_parameters,
    pack_bucket,
    pack_bucket_crc32,
    unpack_bucket,
)
from services.common.weight_wire.pipeline import (
    BROADCASTS_IN_FLIGHT,
    TrackedGroup,
    in_daemon_thread,
    join_all,
    send_buckets,
    start_receiving,
)

__all__ = [
    "BACKENDS",
    "BACKEND_NAMES",
    "BROADCASTS_IN_FLIGHT",
    "DEFAULT_BUCKET_BYTES",
    "BucketEntry",
    "CollectiveGroup",
    "Manifest",
    "TensorEntry",
    "TrackedGroup",
    "bucket_view",
    "build_manifest",
    "crc32",
    "flat_buckets",
    "in_daemon_thread",
    "join_all",
    "lay_out_parameters",
    "pack_bucket",
    "pack_bucket_crc32",
    "send_buckets",
    "start_receiving",
    "unpack_bucket",
]
