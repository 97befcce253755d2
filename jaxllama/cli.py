"""What every `python -m jaxllama.<tool>` shares: one-line flag errors, the `--memory-tokens E:M`
argument, dotted `model.` overrides, and the status lines written to stderr.

One style for all the tools: a bad flag is one line `prog: error: message` on stderr and exit
status 2 (argparse's default is a usage block first, which buries the message); `--help` is
unchanged. Nothing here imports JAX, so `--help` and flag errors answer at once.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Iterable, Sequence


class CliParser(argparse.ArgumentParser):
    """`argparse.ArgumentParser` whose errors are one line and exit status 2.

    `hint(message, argv)` may return extra text appended to the error, e.g. the dotted override
    to use instead of an unknown flag (`train --steps 5` -> `train.steps=5`)."""

    def __init__(self, *args, hint: Callable[[str, list[str]], str | None] | None = None,
                 **kwargs):
        super().__init__(*args, **kwargs)
        self._hint = hint
        self._argv: list[str] = []

    def parse_known_args(self, args=None, namespace=None):
        self._argv = list(sys.argv[1:] if args is None else args)
        return super().parse_known_args(args, namespace)

    def error(self, message: str):
        extra = self._hint(message, self._argv) if self._hint is not None else None
        line = f"{message}; {extra}" if extra else message
        sys.stderr.write(f"{self.prog}: error: {line}\n")
        sys.exit(2)


def memory_tokens_arg(text: str) -> tuple[int, int]:
    """argparse type of `--memory-tokens E:M` -> (episode length E, memory tokens per episode M)."""
    from jaxllama.memory_tokens import parse_memory_tokens

    try:
        return parse_memory_tokens(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix("--memory-tokens ")) from None


def model_overrides(items: Iterable[str], layer_pattern: str | None = None,
                    flag: str = "--override") -> list[str]:
    """Dotted model-config overrides with the `model.` prefix added where it is missing;
    `layer_pattern` (the `--layer-pattern` flag) comes first. A ValueError names an item that
    is not KEY=VALUE."""
    out = [] if layer_pattern is None else [f"model.layer_pattern={layer_pattern}"]
    for item in items:
        if "=" not in item:
            raise ValueError(f"{flag} {item!r}: expected KEY=VALUE, e.g. model.lambda.window=2048")
        out.append(item if item.startswith("model.") else f"model.{item}")
    return out


def flag_hint(message: str, argv: Sequence[str], sections: dict[str, Iterable[str]]) -> str | None:
    """For an unrecognized `--name [value]`: the dotted override naming the same setting, found
    in `sections` ({"train": field names, ...}); None when no section has such a field."""
    if "unrecognized arguments" not in message:
        return None
    hints = []
    for i, arg in enumerate(argv):
        if not arg.startswith("--") or arg == "--":
            continue
        name, _, value = arg[2:].partition("=")
        key = name.replace("-", "_")
        if not value and i + 1 < len(argv) and not argv[i + 1].startswith("-") \
                and "=" not in argv[i + 1]:
            value = argv[i + 1]
        for section, fields in sections.items():
            if key in set(fields):
                hints.append(f"{section}.{key}={value or '...'}")
                break
    return f"settings are dotted overrides: {' '.join(hints)}" if hints else None
