"""The ``chaintune`` command: a thin layer over the public API.

Each command family lives in its own module and registers itself on the app. Command modules import
torch/diffusers only inside command bodies, so ``chaintune --help`` starts in about a second.

``main`` reports failures honestly:

* input errors (bad options, unknown names, missing files, a full disk) print one ``error: ...`` line
  and exit 2;
* anything else is a bug in chaintune: one line saying so, the full traceback written to
  ``$CHAINTUNE_CACHE/logs/crash-*.txt`` (default ``~/.cache/chaintune/logs``), exit 1;
* Ctrl-C prints ``interrupted`` and exits 130; ``CHAINTUNE_DEBUG=1`` re-raises everything.
"""

from __future__ import annotations

import errno
import os
import sys
from pathlib import Path

import typer

app = typer.Typer(
    name="chaintune",
    help="Fine-tune diffusion models along the denoising chain: RLR reward alignment and Diff-Tuning transfer.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    # Plain click help: rich cuts option names and help text at 80 columns in a pipe
    # (`--shared-perturbat…`); click's formatter wraps instead, so everything stays readable.
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 120, "show_default": True},
)

# OSErrors that are about the user's machine, not about chaintune: one line, exit 2.
_ENVIRONMENT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS}


def _register() -> None:
    from chaintune.cli import basic

    basic.register(app)
    for mod in ("pretrain", "align", "transfer", "controlnet", "report"):
        try:
            module = __import__(f"chaintune.cli.{mod}", fromlist=["register"])
        except ModuleNotFoundError as e:
            if e.name != f"chaintune.cli.{mod}":
                raise
            continue
        module.register(app)
    for info in app.registered_commands:  # the command list shows whole first sentences, wrapped, not "..."
        doc = info.help or (info.callback.__doc__ if info.callback else None)
        if info.short_help is None and doc:
            import inspect

            info.short_help = inspect.cleandoc(doc).split("\n\n")[0].replace("\n", " ")


_register()


def _click_errors() -> tuple[tuple[type, ...], tuple[type, ...]]:
    """(ClickException, Abort) classes of every click in use.

    typer >= 0.2x vendors click as ``typer._click`` (its Abort is ``typer.Abort``); older typer parses with
    the ``click`` package, which a command or callback could also raise from.
    """
    usage: list[type] = []
    abort: list[type] = [typer.Abort]
    for name in ("typer._click.exceptions", "click.exceptions"):
        if name == "click.exceptions" and "click" not in sys.modules:
            continue  # nothing can raise from a click that was never imported
        try:
            mod = __import__(name, fromlist=["ClickException"])
        except ImportError:
            continue
        usage.append(mod.ClickException)
        if hasattr(mod, "Abort"):
            abort.append(mod.Abort)
    return tuple(usage), tuple(abort)


def _is_input_error(e: BaseException) -> bool:
    from chaintune.errors import ChaintuneError

    return isinstance(e, ChaintuneError)


def _environment_oserror(e: BaseException) -> OSError | None:
    """The disk-full / permission OSError behind ``e`` (itself or a cause), if any."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in _ENVIRONMENT_ERRNOS:
            return e
        e = e.__cause__ or e.__context__
    return None


def _describe_oserror(e: OSError) -> str:
    what = e.strerror or os.strerror(e.errno)
    where = f": {e.filename}" if e.filename else ""
    hint = {
        errno.ENOSPC: " (free some space or write elsewhere, e.g. with --out)",
        errno.EDQUOT: " (disk quota exceeded; free some space or write elsewhere)",
        errno.EROFS: " (read-only file system; write elsewhere, e.g. with --out)",
    }.get(e.errno, " (check the path's permissions or write elsewhere, e.g. with --out)")
    return f"{what}{where}{hint}"


def crash_log_dir() -> Path:
    """Where crash reports go: ``$CHAINTUNE_CACHE/logs`` or ``~/.cache/chaintune/logs``."""
    root = os.environ.get("CHAINTUNE_CACHE") or Path.home() / ".cache" / "chaintune"
    return Path(root) / "logs"


def write_crash_report(e: BaseException, argv: list[str] | None = None) -> Path | None:
    """Write the full traceback (plus versions and the command line) to a crash file; return its path.

    Falls back to the system temp dir when the log dir is not writable; None if nothing is writable.
    """
    import datetime
    import platform
    import tempfile
    import traceback

    lines = [
        f"chaintune crash report {datetime.datetime.now().isoformat(timespec='seconds')}",
        f"command: chaintune {' '.join(sys.argv[1:] if argv is None else argv)}",
        f"python {platform.python_version()} on {platform.platform()}",
    ]
    from chaintune import __version__

    versions = [f"chaintune {__version__}"]
    for mod in ("torch", "diffusers", "transformers", "accelerate", "peft", "typer"):
        if mod in sys.modules:
            versions.append(f"{mod} {getattr(sys.modules[mod], '__version__', '?')}")
    lines += [", ".join(versions), "", "".join(traceback.format_exception(type(e), e, e.__traceback__))]
    text = "\n".join(lines)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    for folder in (crash_log_dir(), Path(tempfile.gettempdir())):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / f"crash-{stamp}.txt"
            if path.exists():
                path = folder / f"crash-{stamp}-{os.getpid()}.txt"
            path.write_text(text)
            return path
        except OSError:
            continue
    return None


def _report_bug(e: BaseException, argv: list[str] | None) -> None:
    summary = f"{type(e).__name__}: {e}".splitlines()[0] if str(e) else type(e).__name__
    path = write_crash_report(e, argv)
    where = f"full traceback in {path}" if path else "no crash file could be written; rerun with CHAINTUNE_DEBUG=1"
    print(f"chaintune: internal error (a bug in chaintune, not your input): {summary}; {where} — please report it",
          file=sys.stderr)


def main(argv: list[str] | None = None) -> None:
    debug = os.environ.get("CHAINTUNE_DEBUG") == "1"
    if not debug:  # advice for the user is one line, not a line of our source code
        import warnings

        warnings.formatwarning = lambda message, category, *_args, **_kw: f"{category.__name__}: {message}\n"
    try:
        # typer turns Ctrl-C inside a command into Exit(130), which standalone_mode=False returns as the code
        rv = app(args=argv, prog_name="chaintune", standalone_mode=False)
    except SystemExit:
        raise
    except KeyboardInterrupt:
        rv = 130
    except Exception as e:
        if debug:
            raise
        usage_errors, aborts = _click_errors()
        if isinstance(e, usage_errors) and type(e).__name__ == "NoArgsIsHelpError":
            e.show()  # a bare `chaintune` / `chaintune GROUP`: the help text, as click does
            sys.exit(2)
        if isinstance(e, usage_errors):  # unknown option/command, missing or invalid value
            ctx = getattr(e, "ctx", None)
            see = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
            message = " ".join(e.format_message().split())
            print(f"error: {message}{see}", file=sys.stderr)
            sys.exit(2)
        if isinstance(e, aborts):  # EOF at a prompt
            print("aborted", file=sys.stderr)
            sys.exit(1)
        if _is_input_error(e):
            message = " ".join(str(e).split())  # one line, whatever the message
            print(f"error: {message}", file=sys.stderr)
            sys.exit(2)
        os_error = _environment_oserror(e)
        if os_error is not None:
            print(f"error: {_describe_oserror(os_error)}", file=sys.stderr)
            sys.exit(2)
        _report_bug(e, argv)
        sys.exit(1)
    if rv == 130:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    if isinstance(rv, int) and not isinstance(rv, bool) and rv != 0:  # typer.Exit(code) from a command
        sys.exit(rv)


if __name__ == "__main__":
    main()
