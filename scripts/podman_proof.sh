#!/usr/bin/env bash
# The CPU compose profile with real containers, on a machine with no Docker engine and no
# registry: Debian's podman (as root, runc, explicit rlimits: ../shared/TOOLCHAINS.md), a
# python3 base image made with debootstrap in place of python:3.11-slim, and the Compose v2
# binary of the test extra talking to podman's Docker-compatible socket.
#
#   sudo scripts/podman_proof.sh [STEPS]      # default 5 steps
#
# Prints the build, the demo's step lines from the trainer's log, the services the
# collector's file exporter saw spans from, then brings the stack down.
set -euo pipefail
STEPS="${1:-5}"
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
WORK="${WORK:-/tmp/clotho-podman}"
MIRROR="${MIRROR:-$(awk '/^deb /{print $2; exit}' /etc/apt/sources.list 2>/dev/null || echo http://deb.debian.org/debian)}"
COMPOSE="$("$ROOT/.venv/bin/python" -c 'import compose, pathlib; print(pathlib.Path(compose.__file__).with_name("docker-compose"))')"
PODMAN=(podman --runtime runc)
LIMITS=(--ulimit nofile=1024:20000 --ulimit nproc=1024:4096)
mkdir -p "$WORK"

if ! "${PODMAN[@]}" image exists localhost/clotho-base; then
  echo "== debootstrap base (python3) from $MIRROR"
  rm -rf "$WORK/rootfs"
  debootstrap --variant=minbase --include=python3,python3-venv,python3-pip bookworm "$WORK/rootfs" "$MIRROR"
  tar -C "$WORK/rootfs" -c . | "${PODMAN[@]}" import - localhost/clotho-base
fi

echo "== build clotho:cpu on localhost/clotho-base"
"${PODMAN[@]}" build --pull=never "${LIMITS[@]}" --network host \
  --build-arg BASE_IMAGE=localhost/clotho-base -f "$ROOT/docker/Dockerfile.cpu" -t localhost/clotho:cpu "$ROOT"

echo "== podman's Docker API socket"
SOCK="$WORK/podman.sock"
"${PODMAN[@]}" system service --time=0 "unix://$SOCK" &
SERVICE_PID=$!
trap 'kill "$SERVICE_PID" 2>/dev/null || true' EXIT
for _ in $(seq 50); do [ -S "$SOCK" ] && break; sleep 0.2; done
export DOCKER_HOST="unix://$SOCK"

cd "$ROOT"
export CLOTHO_IMAGE=localhost/clotho:cpu CLOTHO_TRAINER_NUM_STEPS="$STEPS" CLOTHO_TRAINER_BATCH_SIZE=8
# Only our services and the collector's stand-ins can run offline: no registry images.
echo "== compose up (cpu profile, our services)"
"$COMPOSE" -p clotho-proof up -d --no-build service-token model inference gateway trainer env
echo "== waiting for $STEPS steps"
for _ in $(seq 600); do
  n=$("$COMPOSE" -p clotho-proof logs --no-log-prefix trainer 2>/dev/null | grep -c '"event": "step"' || true)
  [ "$n" -ge "$STEPS" ] && break
  sleep 1
done
"$COMPOSE" -p clotho-proof logs --no-log-prefix trainer | grep '"event": "step"' || true
"$COMPOSE" -p clotho-proof ps
echo "== down"
"$COMPOSE" -p clotho-proof down -v
