"""User-facing errors: the CLI prints these as one line and exits non-zero (no traceback)."""

from __future__ import annotations

import difflib


class ChaintuneError(Exception):
    """An error caused by the user's input (names, files, options), shown as one line."""


def unknown_name(kind: str, name: str, choices) -> ChaintuneError:
    """'unknown reward 'digt:3' (did you mean 'digit:3'?); choose from ...'."""
    choices = sorted(choices)
    close = difflib.get_close_matches(name, choices, n=1, cutoff=0.5)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return ChaintuneError(f"unknown {kind} {name!r}{hint}; choose from: {', '.join(choices)}")
