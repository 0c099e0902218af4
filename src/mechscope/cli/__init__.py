"""The ``mechscope`` command line. Nothing in the package imports this module.

Commands are defined once, in :mod:`.commands`, through :func:`.registry.command`. ``--json``
prints ``result.to_dict()`` with the command's arguments under ``"args"``. Only mechscope's own
input errors (:class:`~mechscope.core.errors.MechscopeError`) and file-system errors become a
one-line message (exit status 2); anything else is a bug: it says so, and ``--debug`` (or
``MECHSCOPE_DEBUG=1``) shows its traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from ..core.errors import MechscopeError
from ..core.progress import is_quiet, quiet
from . import commands  # noqa: F401  (registers every command)
from .registry import COMMANDS, MODEL_POSITIONAL, Command, resolve_model_argument


def _subparser(sub, name: str, cmd: Command) -> None:
    p = sub.add_parser(name, help=cmd.help, description=cmd.help,
                       epilog="examples:\n  " + "\n  ".join(cmd.examples),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", action="store_true", help="print machine-readable JSON instead of text")
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show the traceback of any error")
    p.add_argument("--quiet", action="store_true", default=argparse.SUPPRESS,
                   help="no progress bars or stage lines on stderr")
    for a in cmd.args:
        a.add_to(p)
    p.set_defaults(command=cmd)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser, built from :data:`~mechscope.cli.registry.COMMANDS` (``"sae train"`` nests)."""
    parser = argparse.ArgumentParser(
        prog="mechscope", description="Mechanistic interpretability on any Hugging Face causal LM.",
        epilog="examples:\n  " + "\n  ".join(c.examples[0] for c in COMMANDS.values()),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--debug", action="store_true", help="show the traceback of any error")
    parser.add_argument("--quiet", action="store_true", help="no progress bars or stage lines on stderr")
    sub = parser.add_subparsers(dest="name", metavar="COMMAND")
    groups: dict[str, argparse._SubParsersAction] = {}
    for name, cmd in COMMANDS.items():
        if " " not in name:
            _subparser(sub, name, cmd)
            continue
        group, action = name.split(" ", 1)
        if group not in groups:
            g = sub.add_parser(group, help=f"{group}: " + ", ".join(n.split(" ", 1)[1] for n in COMMANDS
                                                                     if n.startswith(group + " ")))
            groups[group] = g.add_subparsers(dest="action", metavar="ACTION", required=True)
        _subparser(groups[group], action, cmd)
    return parser


def _args_dict(args: argparse.Namespace) -> dict:
    return {k: v for k, v in vars(args).items() if k not in ("command", "json", "debug", "quiet", MODEL_POSITIONAL)}


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns the exit status (0 ok, 2 bad input, 1 a bug, 130 interrupted)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    cmd: Command | None = getattr(args, "command", None)
    if cmd is None:
        parser.print_help()
        return 0
    debug = args.debug or bool(os.environ.get("MECHSCOPE_DEBUG"))
    try:
        with quiet(args.quiet or is_quiet()):
            resolve_model_argument(args)
            result = cmd.handler(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (MechscopeError, OSError) as e:
        if debug:
            raise
        print(f"mechscope {cmd.name}: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:
        if debug:
            raise
        print(f"mechscope {cmd.name}: internal error ({type(e).__name__}: {e}). This is a bug in mechscope or a "
              f"library it calls; rerun with --debug for the traceback and report it.", file=sys.stderr)
        return 1
    if os.environ.get("RANK", "0") != "0":  # under torchrun only rank 0 prints results
        return 0
    if args.json:
        data = result.to_dict()
        if isinstance(data, dict):
            data = {**data, "args": _args_dict(args)}
        print(json.dumps(data, indent=2, default=str))
    else:
        print(result.summary())
        stats = getattr(result, "stats", None)
        if debug and isinstance(stats, dict) and stats:  # the engine's counters are for debugging, not findings
            print("engine: " + ", ".join(f"{k}={v}" for k, v in stats.items()), file=sys.stderr)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
