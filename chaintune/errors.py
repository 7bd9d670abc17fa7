"""User-facing errors: the CLI prints these as one line and exits 2 (no traceback).

Anything else that escapes a command is treated as a bug in chaintune (see ``chaintune.cli.main``), so code
that rejects the user's input must raise :class:`ChaintuneError` (or use the helpers below).
"""

from __future__ import annotations

import difflib


class ChaintuneError(ValueError):
    """An error caused by the user's input (names, files, options, their own reward code), shown as one line.

    A ``ValueError`` so callers and tests that catch ``ValueError`` for bad input keep working.
    """


class InputFileNotFoundError(ChaintuneError, FileNotFoundError):
    """A file or folder the user named (or the install should hold) does not exist.

    Also a ``FileNotFoundError``, for callers that catch that. Construct it with one message string.
    """


def unknown_name(kind: str, name: str, choices) -> ChaintuneError:
    """'unknown reward 'digt:3' (did you mean 'digit:3'?); choose from ...'."""
    choices = sorted(choices)
    close = difflib.get_close_matches(name, choices, n=1, cutoff=0.5)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return ChaintuneError(f"unknown {kind} {name!r}{hint}; choose from: {', '.join(choices)}")


def user_code_error(what: str, e: BaseException) -> ChaintuneError:
    """Wrap an exception raised inside the user's own code (a reward function, a module:function spec).

    ``KeyError('missing')`` would print as just ``'missing'``; this names where it came from and its type:
    ``error in your reward 'mymod:fn': KeyError: 'missing' (CHAINTUNE_DEBUG=1 shows the traceback)``.
    """
    err = ChaintuneError(f"error in {what}: {type(e).__name__}: {e} (CHAINTUNE_DEBUG=1 shows the traceback)")
    err.__cause__ = e
    return err

