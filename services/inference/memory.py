"""Memory at the phase boundaries of colocated mode (the engine frees its KV cache while
a trainer on the same device steps, and takes it back after the commit): what the cache
holds, what this process has allocated on the device and its peak during the phase that
just ended, what the whole device uses (the trainer included), and the process's RSS."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class MemoryReport:
    phase: str  # the phase that begins: "released" or "resumed"
    kv_cache_bytes: int
    freed_bytes: int = 0
    allocated_bytes: int = 0
    peak_allocated_bytes: int = 0
    device_used_bytes: int = 0
    device_total_bytes: int = 0
    rss_bytes: int = 0


def rss_bytes() -> int:
    """Resident memory of this process (0 where /proc is missing)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def measure(phase: str, device: torch.device, kv_cache_bytes: int, freed_bytes: int = 0) -> MemoryReport:
    """The report at a phase boundary; on CUDA it restarts the peak count, so the next
    report's peak covers the phase beginning now."""
    allocated = peak = used = total = 0
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        allocated = torch.cuda.memory_allocated(device)
        peak = torch.cuda.max_memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        free, total = torch.cuda.mem_get_info(device)
        used = total - free
    return MemoryReport(phase, kv_cache_bytes, freed_bytes, allocated, peak, used, total, rss_bytes())
