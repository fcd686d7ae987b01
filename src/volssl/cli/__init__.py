"""The ``volssl`` console command. Each subcommand lives in its own module of this package, which
defines ``register(subparsers)``; the heavy imports happen inside the command, so ``volssl --help``
stays fast.

Errors. :func:`main` is the one error boundary of every command. A user error -- a path, a permission,
a format, a schema, a resource: FileNotFoundError, PermissionError, IsADirectoryError,
NotADirectoryError, FileExistsError and every other OSError (a symbolic link loop, a read-only file
system, a full disk), ValueError (json.JSONDecodeError included), KeyError, a volume that cannot be
read, MemoryError / CUDA out of memory -- ends the command with one line on stderr::

    volssl <command>: error: <what is wrong, naming the file>

and the exit code of its class; no traceback unless ``volssl --debug <command>`` (or the
``VOLSSL_DEBUG`` environment variable set to anything but ``""``/``0``) asks for one. Any other
exception is a bug in volssl: its traceback is printed, followed by a line asking to report it.

Exit codes (:mod:`volssl.util.errors`):

* 0 success;
* 1 internal error (a bug: traceback, then ``volssl <command>: internal error: ... please report``);
* 2 usage or input error: bad argument value, missing input, wrong kind of path (a file where a
  folder is expected or the reverse, an output path that is an existing file), unreadable format,
  symbolic link loop, schema error; argparse's own usage errors are 2 as well;
* 3 partial failure: some cases failed or were skipped (``--strict`` of predict and
  evaluate-instances; evaluate when a pair could not be scored; agglomerate when a file failed);
* 4 I/O or permission error while working (permission denied, read-only file system, disk full, I/O error);
* 5 out of memory or another exhausted resource;
* 130 interrupted (Ctrl-C); 141 standard output closed early (``volssl ... | head``), silently.
"""
from __future__ import annotations

import argparse
import importlib
import os
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
    "export",  # volssl export
    "bench",  # volssl bench loader|step|...
    "demo",  # volssl demo
    "benchmark",  # volssl benchmark
    "search",  # volssl search
]

# the commands a module registers where they are not just the module's name: `volssl <command>` then
# imports that one module (a fast start: some modules import torch to register); tests check this map
EXTRA_COMMANDS = {
    "finetune": ("finetune", "recipes"),
    "instances": ("agglomerate", "evaluate-instances"),
    "configs": ("presets", "config"),
    "models": ("models", "import-checkpoint"),
}
_DEBUG_HELP = "print the traceback of an error (also: environment variable VOLSSL_DEBUG=1)"


def module_of(command: str) -> str | None:
    """The module (in volssl.cli) that registers ``command``, or None if unknown."""
    for name in COMMAND_MODULES:
        if command in EXTRA_COMMANDS.get(name, (name,)):
            return name
    return None


def _command_in(argv: list[str]) -> str | None:
    """The subcommand named in ``argv``: its first word that is not a global option."""
    for word in argv:
        if word == "--debug":
            continue
        return None if word.startswith("-") else word
    return None


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The ``volssl`` parser; with ``command`` (a known subcommand) only its module is registered."""
    from volssl import __version__

    parser = argparse.ArgumentParser(
        prog="volssl",
        description="Self-supervised pre-training of 3D segmentation networks and few-label fine-tuning.",
        epilog="exit codes: 0 ok, 1 internal error (a bug), 2 usage or input error, 3 some cases failed, "
               "4 I/O or permission error, 5 out of memory, 130 interrupted",
    )
    parser.add_argument("--version", action="version", version=f"volssl {__version__}")
    parser.add_argument("--debug", action="store_true", help=_DEBUG_HELP)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    only = module_of(command) if command else None
    for name in [only] if only else COMMAND_MODULES:
        try:
            module = importlib.import_module(f"volssl.cli.{name}")
        except ModuleNotFoundError as e:  # a command group not written yet
            if e.name == f"volssl.cli.{name}":
                continue
            raise
        module.register(sub)
    for sub_parser in set(sub.choices.values()):  # `volssl predict ... --debug` works too
        try:
            sub_parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=_DEBUG_HELP)
        except argparse.ArgumentError:  # the command has a --debug of its own
            pass
    return parser


def debug_requested(args: argparse.Namespace | None = None) -> bool:
    """``--debug`` was given, or the VOLSSL_DEBUG environment variable is set (not "" or "0")."""
    if args is not None and getattr(args, "debug", False) is True:
        return True
    return os.environ.get("VOLSSL_DEBUG", "").strip().lower() not in ("", "0", "false", "no")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(_command_in(argv))
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        rc = args.func(args)
        sys.stdout.flush()
    except Exception as e:  # noqa: BLE001 - the error boundary
        return report_error(e, args)
    except KeyboardInterrupt as e:
        return report_error(e, args)
    return int(rc or 0)


def report_error(e: BaseException, args: argparse.Namespace) -> int:
    """Print what went wrong (module docstring) and return the exit code."""
    import traceback

    from volssl.util.errors import EXIT_BROKEN_PIPE, EXIT_INTERNAL, exit_code, user_message

    command = getattr(args, "command", None) or "volssl"
    prefix = f"volssl {command}"
    code = exit_code(e)
    debug = debug_requested(args)
    if code == EXIT_BROKEN_PIPE:  # `volssl ... | head`: stdout is gone, say nothing
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        except (OSError, ValueError):
            pass
        return code
    if code is None:  # a bug
        traceback.print_exception(e, file=sys.stderr)
        from volssl import __version__

        print(f"{prefix}: internal error: {type(e).__name__}: {' '.join(str(e).split())} -- this is a bug in "
              f"volssl {__version__}; please report it with the command line and the traceback above",
              file=sys.stderr)
        return EXIT_INTERNAL
    if debug:
        traceback.print_exception(e, file=sys.stderr)
    if isinstance(e, KeyboardInterrupt):
        print(f"{prefix}: interrupted" + (f": {e}" if str(e) else ""), file=sys.stderr)
    else:
        print(f"{prefix}: error: {user_message(e)}", file=sys.stderr)
    return code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
