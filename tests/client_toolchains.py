"""The Go and TypeScript toolchains for the tests of clients/go and clients/typescript.

`make setup-clients` installs them (Debian's Go packages; `npm ci`). A test that needs
one calls `require_go()` / `require_node()`: without the toolchain it skips, except in
CI (`CI=true`), where it fails — there the clients must be tested.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
from pathlib import Path
from typing import NoReturn

import pytest

ROOT = Path(__file__).resolve().parents[1]
GO_DIR = ROOT / "clients" / "go"
TS_DIR = ROOT / "clients" / "typescript"
# Offline build of the Go module against Debian's sources (see offline/go.debian.mod).
GO_FLAGS = ["-modfile=offline/go.debian.mod"]


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def missing(what: str) -> NoReturn:
    message = f"{what} is not installed: run `make setup-clients`"
    if in_ci():
        pytest.fail(f"{message} (CI=true: client tests must run)")
    pytest.skip(message)


def go_env() -> dict[str, str]:
    env = dict(os.environ, GOFLAGS="-mod=mod", GOPROXY="off", GOTOOLCHAIN="local", CGO_ENABLED="0")
    env.setdefault("GOCACHE", str(ROOT / ".clotho" / "go-cache"))
    return env


def require_go() -> str:
    go = shutil.which("go")
    if go is None:
        missing("Go (golang-go and the Debian gRPC/protobuf packages)")
    for plugin in ("protoc-gen-go", "protoc-gen-go-grpc"):
        if shutil.which(plugin) is None:
            missing(plugin)
    return go


def require_node() -> str:
    node = shutil.which("node")
    if node is None:
        missing("node")
    if not (TS_DIR / "node_modules" / ".bin" / "tsc").exists():
        missing("clients/typescript/node_modules (npm ci)")
    return node


@functools.cache
def go_binary(package: str, out_dir: str) -> Path:
    """Build `package` (e.g. ./examples/consumer) of clients/go into out_dir, once."""
    go = require_go()
    out = Path(out_dir) / package.strip("./").replace("/", "_")
    subprocess.run(
        [go, "build", *GO_FLAGS, "-o", str(out), package],
        cwd=GO_DIR,
        env=go_env(),
        check=True,
        timeout=600,
        capture_output=True,
    )
    return out


@functools.cache
def ts_build() -> Path:
    """Compile clients/typescript (src, tests, examples) into its dist/, once."""
    require_node()
    subprocess.run(
        [str(TS_DIR / "node_modules" / ".bin" / "tsc"), "-p", "tsconfig.json"],
        cwd=TS_DIR,
        check=True,
        timeout=600,
        capture_output=True,
    )
    return TS_DIR / "dist"
