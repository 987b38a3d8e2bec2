"""`python -m services.inference --model-path DIR [--grpc-port 0] ...`"""

from __future__ import annotations

import sys

from services.common.access import Access
from services.common.server import run_main
from services.common.settings import load_settings
from services.inference.server import serve
from services.inference.settings import InferenceSettings


def main(argv: list[str] | None = None) -> None:
    settings = load_settings(InferenceSettings, sys.argv[1:] if argv is None else argv)
    try:
        settings.resolved_model_path()
        Access.from_settings(settings).check_exposure("inference", [settings.host])
    except (ValueError, OSError) as exc:
        print(f"clotho inference: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    run_main(lambda: serve(settings), settings.log_level)


if __name__ == "__main__":
    main()
