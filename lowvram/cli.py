"""`lowvram` command line: each subcommand lives beside the feature it drives and is imported on use."""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys

# name -> (module, help). The module defines `<name>_arguments(parser)` and `<name>_main(args) -> int`.
COMMANDS = {
    "info": ("lowvram.info", "show a checkpoint's generation, size and tensors"),
    "chat": ("lowvram.chat_cli", "chat with a model in the terminal"),
    "generate": ("lowvram.chat_cli", "continue a raw prompt"),
    "quantize": ("lowvram.converters.quantize", "quantize a checkpoint to INT8/INT4 (RTN or GPTQ)"),
    "bench": ("lowvram.bench", "measure prefill, decode, load time and memory"),
    "plan": ("lowvram.plan", "show where every block goes for a memory budget"),
    "cache": ("lowvram.repack_cache", "list or clear the repacked weights kept for fast CPU loads"),
}


def _module(name: str):
    return importlib.import_module(COMMANDS[name][0])


def parser() -> argparse.ArgumentParser:
    from . import __version__

    p = argparse.ArgumentParser(prog="lowvram", description="Run GLM models quantized on the hardware you own.")
    p.add_argument("--version", action="version", version=f"lowvram {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_) in COMMANDS.items():
        sp = sub.add_parser(name, help=help_, description=help_)
        try:
            getattr(_module(name), f"{name}_arguments")(sp)
        except (ImportError, AttributeError):
            sp.set_defaults(_unavailable=True)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if not args.command:
        parser().print_help()
        return 2
    if getattr(args, "_unavailable", False):
        print(f"lowvram: error: command {args.command!r} is not available in this build", file=sys.stderr)
        return 2
    from .checkpoint import CheckpointError
    from .config import ConfigError

    signal.signal(signal.SIGTERM, _terminated)
    try:
        return int(getattr(_module(args.command), f"{args.command}_main")(args) or 0)
    except KeyboardInterrupt:
        print("\nlowvram: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `lowvram info --tensors | head`: the reader left; end quietly as `cat` would
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit's flush does not raise again
        return 128 + signal.SIGPIPE
    except OSError as e:  # a path that cannot be read or written: named, without a traceback
        where = f"{e.filename}: " if e.filename and str(e.filename) not in str(e.strerror) else ""
        print(f"lowvram: error: {where}{e.strerror or e}", file=sys.stderr)
        return 1
    except (ConfigError, CheckpointError, ValueError, RuntimeError) as e:
        print(f"lowvram: error: {e}", file=sys.stderr)
        return 1


def _terminated(signum, frame):
    """SIGTERM unwinds like Ctrl-C, so outputs being written are removed, not left half-done."""
    raise SystemExit(128 + signum)


if __name__ == "__main__":
    sys.exit(main())
