"""Atomic file and directory writes: a crash never leaves a half-written output behind."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
from pathlib import Path

from chaintune.errors import ChaintuneError, InputFileNotFoundError, unknown_name


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


def check_output_dir(out: str | Path, flag: str = "--out", fix: str = "give a folder") -> Path:
    """Refuse an output folder that is a file, lies under one, or is (or lies under) a broken symbolic link,
    before any expensive work.

    ``mkdir`` would fail there only after the model has loaded and sampled, with a bare ``NotADirectoryError`` or
    ``FileExistsError``. ``flag`` names the folder in the message, ``fix`` says what to do instead.
    """

    out = Path(out)
    for p in (out, *out.parents):
        if p.is_symlink() and not p.exists():  # dangling, or a loop
            where = f"is a broken link (to {os.readlink(p)})" if p == out else \
                f"lies under the broken link {p} (to {os.readlink(p)})"
            raise ChaintuneError(f"{flag} {out} {where}; {fix}")
        if p.exists():
            if not p.is_dir():
                what = "is a file" if p == out else f"lies under the file {p}"
                raise ChaintuneError(f"{flag} {out} {what}; {fix}")
            break
    return out


def check_overwrite(paths: list[Path], overwrite: bool, flag: str = "--overwrite") -> None:
    """Refuse to replace existing output files unless ``overwrite`` (checked before any work, so nothing is lost).

    Only the named files are ever replaced; other files in their folder are left alone.
    """

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


def check_input_file(path: str | Path, what: str) -> Path:
    """``path`` if it is a regular file; else one clear error (missing, a folder, or not a regular file).

    Checked before the file is opened: opening a FIFO blocks until someone writes to it, and a device such as
    ``/dev/zero`` never ends, so either would hang the command instead of failing it.
    """
    import stat

    path = Path(path)
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise InputFileNotFoundError(f"{what} not found: {path}") from None
    except NotADirectoryError:
        raise InputFileNotFoundError(f"{what} not found: {path} (a part of the path is a file)") from None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise ChaintuneError(f"{what} {path} is a symbolic link loop; give a file") from None
        raise
    if stat.S_ISDIR(mode):
        raise ChaintuneError(f"{what} {path} is a directory; give a file")
    if not stat.S_ISREG(mode):
        raise ChaintuneError(f"{what} {path} is not a regular file (a pipe, socket or device); give a file")
    return path


CONFIG_MAX_BYTES = 1 << 20
"""A config file is options (a saved config.yaml is a few KB); anything larger is not one."""
CONFIG_MAX_DEPTH = 32
"""Options nest two levels (``section: {option: value}``); 32 leaves room for lists of mappings and stops a
file nested thousands deep before the parser (PyYAML's constructor, tomllib) recurses past Python's stack."""
CONFIG_MAX_VALUES = 100_000
"""Values a config may expand to, counting each use of a YAML alias as the values it repeats: a few hundred
bytes of nested aliases (a "billion laughs" file) expand to billions."""


def load_config_file(path: str | Path) -> dict:
    """Read a YAML or TOML config into a dict (one clear error on failure).

    The file must be a regular file of at most :data:`CONFIG_MAX_BYTES`, nested at most :data:`CONFIG_MAX_DEPTH`
    deep and expand to at most :data:`CONFIG_MAX_VALUES` values; YAML is checked on its event stream, before any
    value is built.
    """

    path = check_input_file(path, "config file")
    size = path.stat().st_size
    if size > CONFIG_MAX_BYTES:
        raise ChaintuneError(f"config {path} is {size} bytes; a config file holds options, at most "
                             f"{CONFIG_MAX_BYTES} bytes (put long prompt lists in a --prompt-file)")
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
        except RecursionError:
            raise ChaintuneError(f"config {path} is nested too deeply (more than {CONFIG_MAX_DEPTH} levels); "
                                 "options nest two levels, section: option") from None
        if _depth(data) > CONFIG_MAX_DEPTH:
            raise ChaintuneError(f"config {path} is nested more than {CONFIG_MAX_DEPTH} levels deep; options nest "
                                 "two levels, section: option")
    else:
        import yaml

        try:
            _check_yaml_shape(text, path)
            data = yaml.load(text, Loader=_yaml_loader()) or {}
        except yaml.YAMLError as e:
            raise ChaintuneError(f"config {path} is not valid YAML: {' '.join(str(e).split())}") from None
    if not isinstance(data, dict):
        raise ChaintuneError(f"config {path} must be a mapping of option: value")
    return data


def _yaml_loader():
    """libyaml's safe loader when PyYAML was built with it (the same documents, parsed in C), else PyYAML's."""
    import yaml

    return getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def _check_yaml_shape(text: str, path: Path) -> None:
    """Refuse a YAML document nested deeper than :data:`CONFIG_MAX_DEPTH` or expanding to more than
    :data:`CONFIG_MAX_VALUES` values, from its event stream (the parser is iterative: nothing recurses and no
    value is built). Each alias counts the values of the node it repeats, so nested aliases add up as they would
    expand."""
    import yaml

    sizes: dict[str, int] = {}  # anchor -> values in its node
    open_nodes: list[tuple[str | None, int]] = []  # (anchor, values counted before it) of each open collection
    values = 0
    for event in yaml.parse(text, Loader=_yaml_loader()):
        if isinstance(event, yaml.AliasEvent):
            values += sizes.get(event.anchor, 1)
        elif isinstance(event, yaml.ScalarEvent):
            values += 1
            if event.anchor:
                sizes[event.anchor] = 1
        elif isinstance(event, yaml.CollectionStartEvent):
            open_nodes.append((event.anchor, values))
            values += 1
            if len(open_nodes) > CONFIG_MAX_DEPTH:
                raise ChaintuneError(f"config {path} is nested more than {CONFIG_MAX_DEPTH} levels deep; options "
                                     "nest two levels, section: option")
        elif isinstance(event, yaml.CollectionEndEvent):
            anchor, before = open_nodes.pop()
            if anchor:
                sizes[anchor] = values - before
        if values > CONFIG_MAX_VALUES:
            raise ChaintuneError(f"config {path} expands to more than {CONFIG_MAX_VALUES} values (YAML aliases "
                                 "repeat what they name); a config file holds options, write them out")


def _depth(data: object) -> int:
    """How deep lists and mappings nest in ``data`` (iterative: a deep value must not overflow the stack)."""
    deepest, todo = 0, [(data, 1)]
    while todo:
        value, depth = todo.pop()
        if isinstance(value, (list, dict)):
            deepest = max(deepest, depth)
            if depth <= CONFIG_MAX_DEPTH:
                todo.extend((v, depth + 1) for v in (value.values() if isinstance(value, dict) else value))
    return deepest


def lock_holder(path: str | Path) -> str:
    """Who holds the ``flock`` on ``path``, from ``/proc/locks``: ``"pid 123: chaintune sample ..."``; empty where
    that cannot be told (not Linux, or the lock is gone)."""
    try:
        st = os.stat(path)
        with open("/proc/locks") as f:
            lines = f.read().splitlines()
    except OSError:
        return ""
    target = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    for line in lines:
        parts = line.split()
        # "1: FLOCK  ADVISORY  WRITE 12345 08:01:1234567 0 EOF" (a blocked waiter's line has "->" after the id)
        if "->" in parts or len(parts) < 6 or parts[1] != "FLOCK" or parts[5] != target:
            continue
        pid = parts[4]
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
        except OSError:
            argv = []
        # the interpreter and script by name: "python chaintune sample --out x"
        command = " ".join(Path(a).name if i < 2 else a for i, a in enumerate(argv))
        return f"pid {pid}: {command[:120]}" if command else f"pid {pid}"
    return ""


def strict_config(cls, values: dict, what: str):
    """``cls(**values)`` for a config dataclass, rejecting unknown keys with a did-you-mean.

    A ``ValueError`` from the dataclass's own checks (``__post_init__``) is about these values, so it is
    raised as a :class:`~chaintune.errors.ChaintuneError` (one ``error:`` line in the CLI).
    """
    from dataclasses import fields

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
