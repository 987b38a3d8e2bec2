"""`python -m services.trainer --model-path D --gateway H:P --inference H:P`.

Data-parallel: `torchrun --nproc-per-node N -m services.trainer ...` (rank 0 serves and
talks to the mesh; the other ranks follow it)."""

from __future__ import annotations

import sys

from services.common.server import run_main
from services.common.settings import load_settings
from services.trainer.server import check_exposure, serve
from services.trainer.settings import TrainerSettings


def main(argv: list[str] | None = None) -> None:
    settings = load_settings(TrainerSettings, sys.argv[1:] if argv is None else argv)
    try:
        check_exposure(settings)
    except (ValueError, OSError) as exc:
        print(f"clotho trainer: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    run_main(lambda: serve(settings), settings.log_level)


if __name__ == "__main__":
    main()
