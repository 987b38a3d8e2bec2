"""Stand-ins for compose.yaml's collector, Jaeger and Prometheus where their images cannot
be pulled (scripts/podman_proof.sh runs this in the project's own image, which already has
opentelemetry-proto, grpcio and pyyaml).

    python collector_standin.py serve /var/lib/otel/traces.jsonl [--listen 0.0.0.0:4317]
    python collector_standin.py show /var/lib/otel/traces.jsonl
    python collector_standin.py scrape /etc/prometheus/prometheus.yml [--retry-seconds 60]

`serve` is an OTLP/gRPC TraceService that appends every export request to a JSON-lines
file, one OTLP/JSON `ExportTraceServiceRequest` per line with hex ids: the collector's
`file` exporter (docker/otel-collector.yaml). `show` reads that file as Jaeger would
show it: spans per service, and the trace that crosses the most services as a tree.
`scrape` fetches every target of a Prometheus configuration once, as Prometheus would.
"""

from __future__ import annotations

import argparse
import base64
import json
import signal
import sys
import threading
import time
import urllib.request
from collections import defaultdict
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import yaml
from google.protobuf import json_format
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

ID_FIELDS = ("traceId", "spanId", "parentSpanId")


def _hex_ids(request: dict[str, Any]) -> dict[str, Any]:
    """protobuf's JSON writes bytes as base64; OTLP/JSON (and the collector) write ids as hex."""
    for rs in request.get("resourceSpans", []):
        for ss in rs.get("scopeSpans", []):
            for span in ss.get("spans", []):
                for key in ID_FIELDS:
                    if key in span:
                        span[key] = base64.b64decode(span[key]).hex()
                for link in span.get("links", []):
                    for key in ("traceId", "spanId"):
                        if key in link:
                            link[key] = base64.b64decode(link[key]).hex()
    return request


class FileExporter(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = path.open("a", encoding="utf-8")
        self._lock = threading.Lock()

    def Export(self, request: trace_service_pb2.ExportTraceServiceRequest, context: Any) -> Any:
        line = json.dumps(_hex_ids(json_format.MessageToDict(request)), separators=(",", ":"))
        with self._lock:
            self._file.write(line + "\n")
            self._file.flush()
        return trace_service_pb2.ExportTraceServiceResponse()

    def close(self) -> None:
        with self._lock:
            self._file.close()


def serve(path: Path, listen: str) -> None:
    exporter = FileExporter(path)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(exporter, server)
    server.add_insecure_port(listen)
    server.start()
    print(f"OTLP/gRPC on {listen} -> {path}", flush=True)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    server.stop(grace=2).wait()
    exporter.close()


def _spans(path: Path) -> list[dict[str, Any]]:
    spans = []
    for line in path.read_text(encoding="utf-8").splitlines():
        for rs in json.loads(line).get("resourceSpans", []):
            attrs = {a["key"]: a.get("value", {}) for a in rs.get("resource", {}).get("attributes", [])}
            service = attrs.get("service.name", {}).get("stringValue", "?")
            for ss in rs.get("scopeSpans", []):
                for span in ss.get("spans", []):
                    spans.append({**span, "service": service})
    return spans


def show(path: Path) -> int:
    spans = _spans(path)
    per_service: dict[str, int] = defaultdict(int)
    traces: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for span in spans:
        per_service[span["service"]] += 1
        traces[span["traceId"]].append(span)
    print(f"{len(spans)} spans in {len(traces)} traces from {path}")
    for service, n in sorted(per_service.items()):
        print(f"  {service}: {n} spans")
    if not traces:
        return 1
    widest = max(traces.values(), key=lambda t: (len({s["service"] for s in t}), len(t)))
    services = sorted({s["service"] for s in widest})
    print(f"trace {widest[0]['traceId']}: {len(widest)} spans across {len(services)} services ({', '.join(services)})")
    ids = {s["spanId"] for s in widest}
    children: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for span in widest:
        parent = span.get("parentSpanId", "")
        children[parent if parent in ids else ""].append(span)

    def walk(parent: str, depth: int, budget: list[int]) -> None:
        for span in sorted(children[parent], key=lambda s: int(s.get("startTimeUnixNano", 0))):
            if budget[0] <= 0:
                return
            budget[0] -= 1
            ms = (int(span.get("endTimeUnixNano", 0)) - int(span.get("startTimeUnixNano", 0))) / 1e6
            print(f"  {'  ' * depth}{span['service']}: {span['name']} ({ms:.1f} ms)")
            walk(span["spanId"], depth + 1, budget)

    walk("", 0, [40])
    return 0


def _scrape_once(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as reply:
        lines = reply.read().decode().splitlines()
    samples = [ln for ln in lines if ln and not ln.startswith("#")]
    clotho = sorted({ln.split("{")[0].split(" ")[0] for ln in samples if ln.startswith("clotho_")})
    return f"{len(samples)} samples, e.g. {', '.join(clotho[:3]) or '-'}"


def scrape(config: Path, retry_seconds: float) -> int:
    """Every target once; a target that does not answer yet is retried for `retry_seconds`."""
    targets = [
        (job["job_name"], f"http://{target}{job.get('metrics_path', '/metrics')}")
        for job in yaml.safe_load(config.read_text())["scrape_configs"]
        for static in job.get("static_configs", [])
        for target in static["targets"]
    ]
    deadline = time.monotonic() + retry_seconds
    failed = 0
    for job, url in targets:
        while True:
            try:
                print(f"  {job} {url}: {_scrape_once(url)}", flush=True)
                break
            except OSError as exc:
                if time.monotonic() < deadline:
                    time.sleep(1)
                    continue
                failed += 1
                print(f"  {job} {url}: FAILED {exc}", flush=True)
                break
    return 1 if failed else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("serve")
    p.add_argument("path", type=Path)
    p.add_argument("--listen", default="0.0.0.0:4317")
    sub.add_parser("show").add_argument("path", type=Path)
    p = sub.add_parser("scrape")
    p.add_argument("config", type=Path)
    p.add_argument("--retry-seconds", type=float, default=0.0)
    args = parser.parse_args()
    if args.cmd == "serve":
        serve(args.path, args.listen)
    elif args.cmd == "show":
        sys.exit(show(args.path))
    else:
        sys.exit(scrape(args.config, args.retry_seconds))


if __name__ == "__main__":
    main()
