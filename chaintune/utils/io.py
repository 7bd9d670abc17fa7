"""Atomic file and directory writes: a crash never leaves a half-written output behind."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path


@contextlib.contextmanager
def atomic_file(path: str | Path, mode: str = "w"):
    """Open a temp file beside ``path``; rename it over ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file normal permissions
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_dir(path: str | Path):
    """Yield a temp directory beside ``path``; swap it into place only if the block succeeds.

    An existing ``path`` is replaced only after the new one is complete.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)
    try:
        yield tmp
        old = None
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


ALLOW_PICKLE_ENV = "CHAINTUNE_ALLOW_PICKLE"


def pickle_allowed(allow_pickle: bool = False) -> bool:
    """Whether loading pickle-based files (``.bin``/``.pt`` weights, TorchScript archives) is allowed.

    Unpickling runs code from the file, so it needs an opt-in: ``allow_pickle`` (CLI ``--allow-pickle``) or
    ``CHAINTUNE_ALLOW_PICKLE=1`` for callers that cannot pass it (the generated ``align``/``transfer`` commands).
    """
    return bool(allow_pickle) or os.environ.get(ALLOW_PICKLE_ENV) == "1"


def check_output_dir(out: str | Path, flag: str = "--out") -> Path:
    """Refuse an output folder that is a file or lies under one, before any expensive work.

    ``mkdir`` would fail there only after the model has loaded and sampled, with a bare ``NotADirectoryError``.
    """
    from chaintune.errors import ChaintuneError

    out = Path(out)
    for p in (out, *out.parents):
        if p.exists():
            if not p.is_dir():
                what = "is a file" if p == out else f"lies under the file {p}"
                raise ChaintuneError(f"{flag} {out} {what}; give a folder")
            break
    return out


def check_overwrite(paths: list[Path], overwrite: bool, flag: str = "--overwrite") -> None:
    """Refuse to replace existing output files unless ``overwrite`` (checked before any work, so nothing is lost).

    Only the named files are ever replaced; other files in their folder are left alone.
    """
    from chaintune.errors import ChaintuneError

    folders = [p for p in paths if p.is_dir()]
    if folders:  # never replaced, even with --overwrite: it is not an output of ours
        raise ChaintuneError(f"{folders[0]} is a folder where an output file goes; move it or choose another --out")
    if overwrite:
        return
    existing = [p for p in paths if p.exists() or p.is_symlink()]
    if existing:
        more = f" (and {len(existing) - 1} more output file(s))" if len(existing) > 1 else ""
        raise ChaintuneError(
            f"{existing[0]} already exists{more}; pass {flag} to replace the outputs of this command "
            "(other files in the folder are kept), or choose another --out"
        )


def save_json(path: str | Path, obj) -> None:
    with atomic_file(path) as f:
        json.dump(obj, f, indent=2, default=str)
        f.write("\n")


def load_config_file(path: str | Path) -> dict:
    """Read a YAML or TOML config into a dict (one clear error on failure)."""
    from chaintune.errors import ChaintuneError, InputFileNotFoundError

    path = Path(path)
    if not path.exists():
        raise InputFileNotFoundError(f"config file not found: {path}")
    if path.is_dir():
        raise ChaintuneError(f"config {path} is a directory; give a .yaml or .toml file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ChaintuneError(f"config {path} is not UTF-8 text ({e})") from None
    if path.suffix == ".toml":
        import tomllib

        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise ChaintuneError(f"config {path} is not valid TOML: {e}") from None
    else:
        import yaml

        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            raise ChaintuneError(f"config {path} is not valid YAML: {' '.join(str(e).split())}") from None
    if not isinstance(data, dict):
        raise ChaintuneError(f"config {path} must be a mapping of option: value")
    return data


def strict_config(cls, values: dict, what: str):
    """``cls(**values)`` for a config dataclass, rejecting unknown keys with a did-you-mean.

    A ``ValueError`` from the dataclass's own checks (``__post_init__``) is about these values, so it is
    raised as a :class:`~chaintune.errors.ChaintuneError` (one ``error:`` line in the CLI).
    """
    from dataclasses import fields

    from chaintune.errors import ChaintuneError, unknown_name

    known = {f.name for f in fields(cls)}
    bad = sorted(set(values) - known)
    if bad:
        raise unknown_name(what, bad[0], known)
    try:
        return cls(**values)
    except ChaintuneError:
        raise
    except ValueError as e:
        raise ChaintuneError(str(e)) from e
