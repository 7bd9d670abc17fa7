"""User-facing errors: the CLI prints these as one line and exits 2 (no traceback).

Anything else that escapes a command is treated as a bug in chaintune (see ``chaintune.cli.main``), so code
that rejects the user's input must raise :class:`ChaintuneError` (or use the helpers below).
"""

from __future__ import annotations

import difflib

SHOWN_CHARS = 200
"""At most this many characters of a bad value go into an error line: a value can be anything the user's input
expands to (a YAML alias bomb is gigabytes), and the line is for reading."""


def shown(value: object, limit: int = SHOWN_CHARS) -> str:
    """``repr(value)`` cut to ``limit`` characters, saying how long it was (``'aaa...' (10000 characters)``).

    Containers are cut before ``repr`` sees all of them: the repr of a value built from shared references (YAML
    aliases) can be far larger than memory, so only its first elements are ever formatted.
    """
    text = _bounded_repr(value, limit + 1)
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({_size(value)})"


def _bounded_repr(value: object, limit: int) -> str:
    """``repr(value)``, or a prefix of it of just over ``limit`` characters: formatting stops there, however many
    (or however deeply nested) elements remain."""
    out: list[str] = []
    used = 0

    def emit(text: str) -> bool:
        nonlocal used
        out.append(text)
        used += len(text)
        return used > limit  # True: enough, stop

    def walk(v: object) -> bool:
        if isinstance(v, (list, tuple)):
            opening, closing = ("[", "]") if isinstance(v, list) else ("(", ")")
            if emit(opening):
                return True
            for i, x in enumerate(v):
                if (i and emit(", ")) or walk(x):
                    return True
            return emit("," + closing if isinstance(v, tuple) and len(v) == 1 else closing)
        if isinstance(v, dict):
            if emit("{"):
                return True
            for i, (k, x) in enumerate(v.items()):
                if (i and emit(", ")) or walk(k) or emit(": ") or walk(x):
                    return True
            return emit("}")
        if isinstance(v, (str, bytes)) and len(v) > limit:
            return emit(repr(v[: limit + 1]))
        try:
            return emit(repr(v))
        except ValueError:  # an int past Python's str-conversion limit
            return emit(f"<{type(v).__name__} too large to print>")

    walk(value)
    return "".join(out)


def _size(value: object) -> str:
    if isinstance(value, (str, bytes)):
        return f"{len(value)} characters"
    if isinstance(value, (list, tuple, dict, set)):
        return f"a {type(value).__name__} of {len(value)} items"
    return type(value).__name__


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
    close = difflib.get_close_matches(name, choices, n=1, cutoff=0.5) if len(name) <= SHOWN_CHARS else []
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return ChaintuneError(f"unknown {kind} {shown(name)}{hint}; choose from: {', '.join(choices)}")


def user_code_error(what: str, e: BaseException) -> ChaintuneError:
    """Wrap an exception raised inside the user's own code (a reward function, a module:function spec).

    ``KeyError('missing')`` would print as just ``'missing'``; this names where it came from and its type:
    ``error in your reward 'mymod:fn': KeyError: 'missing' (CHAINTUNE_DEBUG=1 shows the traceback)``.
    """
    message = " ".join(str(e).split())
    if len(message) > 2 * SHOWN_CHARS:  # an exception's text may quote a whole input
        message = message[: 2 * SHOWN_CHARS] + "..."
    err = ChaintuneError(f"error in {what}: {type(e).__name__}: {message} (CHAINTUNE_DEBUG=1 shows the traceback)")
    err.__cause__ = e
    return err

