"""How a CLI command is defined: once, with its arguments, examples and handler.

A handler takes the parsed arguments and returns a :class:`~mechscope.core.result.Result`; the
CLI prints ``result.summary()``, or with ``--json`` the generic ``result.to_dict()`` plus the
command's arguments under ``"args"``. :class:`Outcome` wraps what is not a technique's result
(paths written, lists of records).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import Any, Callable

from ..core.result import Result, jsonable

#: the valid range of every numeric option, by flag: (lowest, highest, whether the lowest is excluded); checked at
#: parse time, so `--steps -5` is refused before anything loads (a test fails on a numeric option missing here)
RANGES: dict[str, tuple[float | None, float | None, bool]] = {
    "--steps": (1, None, False), "--batch": (1, None, False), "--seqs": (1, None, False),
    "--eval-seqs": (1, None, False), "--held-out-seqs": (1, None, False), "--seq-len": (2, None, False),
    "--width": (1, None, False), "--sae-width": (1, None, False), "--k": (1, None, False), "--n": (1, None, False),
    "--n-features": (1, None, False), "--n-random": (0, None, False), "--random": (0, None, False),
    "--reseeds": (1, None, False), "--split-seeds": (1, None, False), "--certify": (0, None, False),
    "--labels": (0, None, False), "--label-top": (1, None, False), "--max-features": (0, None, False),
    "--heads": (0, None, False), "--screen": (0, None, False), "--partitions": (0, None, False),
    "--reach": (0, None, False), "--patch-rows": (1, None, False), "--seed": (0, None, False),
    "--ig-steps": (0, None, False), "--patching-top": (0, None, False), "--layers": (0, None, False),
    "--prefixes": (1, None, False), "--l0": (1, None, False), "--lr": (0, None, True),
    "--l1": (0, None, False), "--l0-coefficient": (0, None, False), "--node-threshold": (0, 1, True),
    "--edge-threshold": (0, 1, True), "--target": (0, None, True), "--threshold": (None, None, False),
    "--docs": (1, None, False), "--first": (1, None, False), "--alpha": (None, None, False),
    "--crosscoder-width": (1, None, False), "--crosscoder-k": (1, None, False), "--crosscoder-steps": (1, None, False),
    "--crosscoder-batch": (1, None, False), "--domain-seed": (0, None, False), "--words": (3, None, False),
    "--rank": (1, None, False), "--crosscoder-tokens": (1, None, False),
}


def ranged(flag: str, kind: type) -> Callable[[str], Any]:
    """An argparse ``type`` reading ``kind`` and refusing a value outside ``RANGES[flag]``, saying the range."""
    low, high, open_low = RANGES[flag]

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, got {text!r}") \
                from None
        if low is not None and (value <= low if open_low else value < low) or high is not None and value > high:
            bound = (f"above {low}" if open_low else f"at least {low}") if low is not None else ""
            bound += (" and " if bound and high is not None else "") + (f"at most {high}" if high is not None else "")
            raise argparse.ArgumentTypeError(f"must be {bound}, got {text}")
        return value

    parse.__name__ = kind.__name__
    return parse


@dataclass(frozen=True)
class Arg:
    """One ``argparse`` argument: its flags (or positional name) and keyword options; a numeric option is checked
    against its range in :data:`RANGES` as it is parsed."""

    flags: tuple[str, ...]
    options: dict = field(default_factory=dict)

    def add_to(self, parser: argparse.ArgumentParser) -> None:
        options = dict(self.options)
        if options.get("type") in (int, float) and self.flags[0] in RANGES:
            options["type"] = ranged(self.flags[0], options["type"])
        parser.add_argument(*self.flags, **{**options, "help": self.help_text()})

    def help_text(self) -> str:
        """The help line, with the default appended when there is one to show (``--help`` shows every default)."""
        text = self.options.get("help", "")
        default = self.options.get("default")
        shown = default not in (None, False, argparse.SUPPRESS, "") and self.options.get("action") != "store_true"
        if shown and "default" not in text:
            text += f" (default: {str(default).replace('%', '%%')})"
        return text


def arg(*flags: str, **options) -> Arg:
    return Arg(flags, options)


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    examples: tuple[str, ...]
    args: tuple[Arg, ...]
    handler: Callable[[argparse.Namespace], Result]


COMMANDS: dict[str, Command] = {}
MODEL_POSITIONAL = "model_positional"  # the model as a positional argument, where a command has no other one


def resolve_model_argument(args: argparse.Namespace) -> None:
    """Fold the positional model into ``args.model``; both given and different is an error."""
    from ..core.errors import InputError

    given = getattr(args, MODEL_POSITIONAL, None)
    if given is None:
        return
    if getattr(args, "model", None) not in (None, given):
        raise InputError(f"two models given: {given!r} and --model {args.model!r}; give one")
    args.model = given


def command(name: str, help: str, examples: tuple[str, ...], *args: Arg | tuple[Arg, ...]) -> Callable:
    """Register the decorated handler as ``mechscope NAME``; ``args`` may mix single args and groups of them."""
    flat: list[Arg] = []
    for a in args:
        flat += list(a) if isinstance(a, tuple) else [a]
    takes_model = any(a.flags == ("--model",) for a in flat)
    if takes_model and not any(not a.flags[0].startswith("-") for a in flat):  # `mechscope info ./my-model`
        flat.append(arg(MODEL_POSITIONAL, nargs="?", default=None, metavar="MODEL",
                        help="the model, as with --model (give one or the other)"))

    def register(fn: Callable[[argparse.Namespace], Result]) -> Callable[[argparse.Namespace], Result]:
        COMMANDS[name] = Command(name, help, tuple(examples), tuple(flat), fn)
        return fn

    return register


@dataclass(repr=False)
class Outcome(Result):
    """A command's output that is not a technique result: the text to print and the JSON data."""

    text: str
    data: Any = None

    def summary(self) -> str:
        return self.text

    def to_dict(self) -> Any:
        return jsonable(self.data)
