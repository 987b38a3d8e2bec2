"""Command lines of the services the tests start as real processes."""

from __future__ import annotations

from pathlib import Path


def gateway_args(workdir: Path, inference: str | None = None, tokenizer: Path | str | None = None) -> list[str]:
    """A gateway on free ports with its store under `workdir`, in front of the inference
    service at `inference` (host:port) and reading its tokenizer from `tokenizer`."""
    args = ["--http-port", "0", "--grpc-port", "0", "--grace-seconds", "1", "--data-dir", str(workdir / "store")]
    if inference is not None:
        args += ["--inference", inference]
    if tokenizer is not None:
        args += ["--tokenizer-path", str(tokenizer)]
    return args
