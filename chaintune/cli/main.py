"""The ``chaintune`` command: a thin layer over the public API.

Each command family lives in its own module and registers itself on the app; ``main`` turns
user errors into one clear line and a non-zero exit instead of a traceback.
"""

from __future__ import annotations

import os
import sys

import typer

app = typer.Typer(
    name="chaintune",
    help="Fine-tune diffusion models along the denoising chain: RLR reward alignment and Diff-Tuning transfer.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

_USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, KeyError, TypeError,
                                                  NotImplementedError, OSError, RuntimeError)


def _register() -> None:
    from chaintune.cli import basic

    basic.register(app)
    for mod in ("align", "transfer", "report"):
        try:
            module = __import__(f"chaintune.cli.{mod}", fromlist=["register"])
        except ModuleNotFoundError as e:
            if e.name != f"chaintune.cli.{mod}":
                raise
            continue
        module.register(app)


_register()


def main(argv: list[str] | None = None) -> None:
    from chaintune.errors import ChaintuneError

    debug = os.environ.get("CHAINTUNE_DEBUG") == "1"
    if not debug:  # advice for the user is one line, not a line of our source code
        import warnings

        warnings.formatwarning = lambda message, category, *_args, **_kw: f"{category.__name__}: {message}\n"
    if os.environ.get("CHAINTUNE_THREADS"):  # e.g. 1 when several jobs share a small CPU
        import torch

        torch.set_num_threads(int(os.environ["CHAINTUNE_THREADS"]))
    try:
        app(args=argv, standalone_mode=False)
    except SystemExit:
        raise
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except ChaintuneError as e:
        if debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except Exception as e:  # click usage errors and the user-error classes get one line
        import click

        if isinstance(e, click.exceptions.ClickException):
            e.show()
            sys.exit(e.exit_code)
        if isinstance(e, click.exceptions.Abort):
            sys.exit(1)
        if debug or not isinstance(e, _USER_ERRORS):
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
