"""`python -m services.gateway [--host H] [--port P] [--grpc-port 0] [--data-dir D]
[--inference host:port]`: `--host/--port` serve the trajectory API where Atropos'
`run-api --host H --port P` would."""

from __future__ import annotations

import sys

from services.common.server import run_main
from services.common.settings import load_settings
from services.gateway.server import serve
from services.gateway.settings import GatewaySettings


def main(argv: list[str] | None = None) -> None:
    settings = load_settings(GatewaySettings, sys.argv[1:] if argv is None else argv)
    run_main(lambda: serve(settings), settings.log_level)


if __name__ == "__main__":
    main()
