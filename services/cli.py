"""The `clotho` command: `up` runs the whole mesh; the other verbs run one piece."""

from __future__ import annotations

import runpy
import sys

USAGE = """usage: clotho <command> [flags]

commands:
  up            start inference, gateway, trainer and the demo environment and train
  gateway       run the gateway (Atropos API + SGLang/OpenAI routes + GatewayService)
  inference     run an inference service (torch engine)
  trainer       run the GRPO trainer
  demo-env      run the built-in demo environment against a gateway
  build-model   write the tiny local model and tokenizer into a directory
  health        ask a service's gRPC health (exit 0 when SERVING; container health checks)

`clotho <command> --help` lists a command's flags."""

MODULES = {
    "gateway": "services.gateway",
    "inference": "services.inference",
    "trainer": "services.trainer",
    "demo-env": "services.demo.env",
    "build-model": "services.demo.tiny_model",
}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        raise SystemExit(0 if argv else 2)
    command, rest = argv[0], argv[1:]
    if command == "up":
        from services.up import main as up_main

        raise SystemExit(up_main(rest))
    if command == "health":
        from services.health import main as health_main

        raise SystemExit(health_main(rest))
    module = MODULES.get(command)
    if module is None:
        print(f"clotho: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
        raise SystemExit(2)
    sys.argv = [f"clotho {command}", *rest]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
