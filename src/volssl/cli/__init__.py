"""The ``volssl`` console command. Each subcommand lives in its own module of this package, which
defines ``register(subparsers)``; the heavy imports happen inside the command, so ``volssl --help``
stays fast."""
from __future__ import annotations

import argparse
import importlib
import sys

# module name (in volssl.cli) for each group of subcommands, in the order --help lists them
COMMAND_MODULES = [
    "phantoms",  # volssl phantoms
    "preprocess",  # volssl preprocess
    "pretrain",  # volssl pretrain
    "probe",  # volssl probe
    "finetune",  # volssl finetune, volssl recipes
    "predict",  # volssl predict
    "evaluate",  # volssl evaluate
    "instances",  # volssl agglomerate, volssl evaluate-instances
    "report",  # volssl report
    "configs",  # volssl presets, volssl config show
    "models",  # volssl models, volssl import-checkpoint
    "bench",  # volssl bench loader|step|...
    "demo",  # volssl demo
    "benchmark",  # volssl benchmark
    "search",  # volssl search
]


def build_parser() -> argparse.ArgumentParser:
    from volssl import __version__

    parser = argparse.ArgumentParser(
        prog="volssl",
        description="Self-supervised pre-training of 3D segmentation networks and few-label fine-tuning.",
    )
    parser.add_argument("--version", action="version", version=f"volssl {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(f"volssl.cli.{name}")
        except ModuleNotFoundError as e:  # a command group not written yet
            if e.name == f"volssl.cli.{name}":
                continue
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        rc = args.func(args)
    except KeyboardInterrupt:
        print("volssl: interrupted", file=sys.stderr)
        return 130
    except (FileNotFoundError, ValueError, KeyError) as e:
        if getattr(args, "debug", False) or __import__("os").environ.get("VOLSSL_DEBUG"):
            raise
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"volssl {args.command}: error: {msg}", file=sys.stderr)
        return 2
    return int(rc or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
