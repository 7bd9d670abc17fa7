"""A run directory: what ``align``/``transfer`` write, and a model id in its own right.

Layout::

    runs/X/
      chaintune_run.json   what ran: command, base model, peft method, resolved config, status
      config.yaml          the resolved config (re-runnable with --config)
      metrics.jsonl        one JSON object per logged step
      model/               the tuned model as a diffusers pipeline (from_pretrained) — LoRA merged
      adapter/             LoRA only: adapter weights (peft format; plus diffusers' LoRA format where the
                           pipeline has a loader, SD and SD3: ``pipe.load_lora_weights("runs/X/adapter")``)
      samples/             sample grids at each evaluation
      checkpoints/         resumable training state (see chaintune.run.checkpoint)
      tb/                  tensorboard logs

``chaintune.load("runs/X")`` loads ``model/`` when present, else the base model plus ``adapter/``
(that reading side lives in :mod:`chaintune.backends.run_dir`; ``RUN_MARKER`` and ``read_run_info``
are re-exported here).
"""

from __future__ import annotations

import contextlib
import copy
import glob
import os
import re
import shutil
import tempfile
import time
from pathlib import Path

from chaintune.adapters import lora_state_dict, merge_lora
from chaintune.backends.run_dir import RUN_MARKER, read_run_info
from chaintune.errors import ChaintuneError
from chaintune.utils.io import atomic_dir, check_output_dir, save_json

TRASH_PREFIX = ".chaintune-trash-"  # --overwrite empties a run through this folder inside it

__all__ = ["RUN_MARKER", "RUN_ENTRIES", "MERGE_LIMIT", "RunLock", "check_run_dir", "foreign_entries", "prepare_run_dir",
           "remove_leftovers", "write_run_info", "read_run_info", "save_tuned_model"]

MERGE_LIMIT = 300_000_000  # parameters; above this only the adapter is written (a merged SD is GBs)


# what a run directory holds: chaintune's own entries. ``--overwrite`` deletes a folder only when it holds nothing
# else, and ``--resume`` needs the marker. ``model/``, ``best/`` and ``adapter/`` are written whole (atomic_dir), so
# everything under them is ours; elsewhere only the names below are (a user's file anywhere stops --overwrite).
RUN_ENTRIES = frozenset({RUN_MARKER, "config.yaml", "metrics.jsonl", "model", "adapter", "best", "samples",
                         "checkpoints", "tb", "report.html"})
_RUN_FOLDERS = frozenset({"model", "adapter", "best", "samples", "checkpoints", "tb"})
_OURS_WHOLE = ("model", "adapter", "best", "checkpoints/step_*")
_OURS_FILES = (RUN_MARKER, "config.yaml", "metrics.jsonl", "report.html", "samples/step_*.png", "samples/step_*.gif",
               "tb/events.out.tfevents.*")
# what a killed write leaves (atomic_file/atomic_dir temps, a replaced folder, a pruned checkpoint, --overwrite's
# trash): removed under the lock when the run is next opened
_LEFTOVERS = (".*.tmp", ".*.old-*", TRASH_PREFIX + "*", "checkpoints/.*", "samples/.*.tmp")


def _matches(rel: str, patterns: tuple[str, ...]) -> bool:
    import fnmatch

    return any(fnmatch.fnmatchcase(rel, pat) for pat in patterns)


def foreign_entries(path: str | Path) -> list[str]:
    """Paths under run ``path`` (relative, sorted) that chaintune did not write: a user's notes, a ``.git``, a file
    dropped into ``samples/``. Links are never ours. Folders of ours that hold only ours are not listed."""
    path = Path(path)
    found: list[str] = []
    for root, dirs, files in os.walk(path):
        here = Path(root).relative_to(path)
        keep = []
        for d in sorted(dirs):
            rel = (here / d).as_posix()
            full = Path(root) / d
            if full.is_symlink():
                found.append(rel)
            elif _matches(rel, _OURS_WHOLE + _LEFTOVERS):
                continue  # written whole by chaintune (or a leftover of a killed write)
            elif rel in _RUN_FOLDERS:
                keep.append(d)  # ours, look inside
            else:
                found.append(rel + "/")
        dirs[:] = keep
        for f in sorted(files):
            rel = (here / f).as_posix()
            if (Path(root) / f).is_symlink() or not _matches(rel, _OURS_FILES + _LEFTOVERS):
                found.append(rel)
    return sorted(found)


def _only_leftovers(path: Path) -> bool:
    """An empty run folder, or one holding only what killed writes leave (nothing to keep, nothing to resume)."""
    return all(_matches(e.name, _LEFTOVERS) for e in path.iterdir())


def _unstarted(path: Path) -> bool:
    """A run killed before its marker was written (chaintune < 0.1.1 wrote config.yaml first): only config.yaml
    and leftovers. It is ours to resume (which starts it over) or overwrite."""
    return not (path / RUN_MARKER).exists() and all(e.name == "config.yaml" or _matches(e.name, _LEFTOVERS)
                                                   for e in path.iterdir())


def _named(items: list[str], limit: int = 3) -> str:
    return ", ".join(items[:limit]) + (f" and {len(items) - limit} more" if len(items) > limit else "")


def check_run_dir(path: str | Path, *, overwrite: bool = False, resume: bool = False,
                  inputs: tuple[str | Path | None, ...] = ()) -> None:
    """Everything that can be said about ``path`` before a model is loaded or a file written.

    ``--overwrite`` replaces only a recognisable chaintune run (its marker file, nothing but chaintune's own
    entries), never the working directory or one of its parents, nor a run that holds one of the command's
    ``inputs`` (the model it trains from); ``--resume`` needs a run, and contradicts ``--overwrite``.
    """

    path = Path(path)
    if resume and overwrite:
        raise ChaintuneError("--resume continues the run and --overwrite deletes it: give one of them")
    check_output_dir(path)  # not a file or a broken link, nor under one
    busy = path.is_dir() and not _only_leftovers(path)
    if busy and (overwrite or resume):
        _check_not_an_input(path, inputs)
    if resume:
        if not (path / RUN_MARKER).is_file() and not (path.is_dir() and _unstarted(path)):
            raise ChaintuneError(f"--resume: {path} is not a chaintune run (no {RUN_MARKER})")
        for name in sorted(RUN_ENTRIES):  # a folder where the run writes a file, or a file where it keeps a folder
            entry = path / name
            if entry.exists() and entry.is_dir() != (name in _RUN_FOLDERS):
                what = "a folder" if entry.is_dir() else "a file"
                raise ChaintuneError(f"--resume: {entry} is {what}, where the run keeps its "
                                     f"{'folder' if name in _RUN_FOLDERS else 'file'} of that name; move it away")
        return
    if not busy:
        return
    if not overwrite:
        raise ChaintuneError(f"{path} already holds files; pass --resume to continue it or --overwrite to replace it")
    here = Path.cwd().resolve()
    if path.resolve() == here or path.resolve() in here.parents:
        raise ChaintuneError(f"--overwrite will not delete {path}: it is the working directory or one of its parents")
    if not (path / RUN_MARKER).is_file() and not _unstarted(path):
        raise ChaintuneError(f"--overwrite deletes only chaintune runs; {path} has no {RUN_MARKER}, so its files are "
                             "left alone (choose another --out)")
    others = foreign_entries(path)
    if others:
        raise ChaintuneError(f"--overwrite will not delete {path}: it holds files chaintune did not write "
                             f"({_named(others)}); move them out or choose another --out")


def _check_not_an_input(path: Path, inputs: tuple[str | Path | None, ...]) -> None:
    """Refuse to overwrite or resume into a run that the command reads from (``--model R --out R``)."""
    target = path.resolve()
    for given in inputs:
        if given is None or not isinstance(given, (str, Path)) or not Path(given).exists():
            continue  # a builtin or hub id, or nothing
        src = Path(given).resolve()
        if src == target or target in src.parents:
            raise ChaintuneError(f"--out {path} holds {given}, which this command reads from; write the new run "
                                 "elsewhere (e.g. --out runs/NEW)")


class RunLock:
    """One writer per run: an exclusive OS lock (``flock``) on the run directory itself.

    The kernel releases it when the process exits in any way (a crash or SIGKILL leaves no stale lock),
    and ``--overwrite`` empties the directory instead of replacing it, so the lock stays on the same
    inode. Where ``fcntl`` is missing (Windows) runs are not locked.
    """

    def __init__(self, path: Path):
        self.path, self._fd = Path(path), None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> RunLock:
        if self._fd is not None:
            return self
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not POSIX
            return self
        fd = os.open(self.path, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            who = ""
            with contextlib.suppress(ChaintuneError, KeyError, TypeError):
                info = read_run_info(self.path)
                who = f" (pid {info['pid']} on {info.get('host', '?')}, {info.get('command', '?')})"
            raise ChaintuneError(f"{self.path} is being written by another chaintune process{who}; wait for it "
                                 "or choose another --out") from None
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None


def prepare_run_dir(path: str | Path, *, overwrite: bool = False, resume: bool = False,
                    lock: RunLock | None = None) -> RunLock:
    """Create (or, with ``overwrite``, empty) the run directory under its lock; returns the held lock.

    Call :func:`check_run_dir` first, before loading anything. Leftovers of killed writes (temp files
    and directories, half-pruned checkpoints) are removed here, which is safe under the lock.
    """
    path = Path(path)
    check_run_dir(path, overwrite=overwrite, resume=resume)
    path.mkdir(parents=True, exist_ok=True)
    lock = (lock or RunLock(path)).acquire()
    remove_leftovers(path)
    if overwrite and any(path.iterdir()):
        # inside the run: the run disappears at once, and a kill while deleting leaves a leftover that the next
        # open of the run removes (never a stray copy beside it)
        trash = Path(tempfile.mkdtemp(dir=path, prefix=TRASH_PREFIX))
        for entry in list(path.iterdir()):
            if entry != trash:
                os.replace(entry, trash / entry.name)
        shutil.rmtree(trash, ignore_errors=True)
    return lock


# the trash folder earlier versions made beside a run (tempfile.mkdtemp(prefix=".NAME.old-")): ".old-" + 8 characters
_OLD_BESIDE = re.compile(r"\.old-[a-z0-9_]{8}")


def remove_leftovers(path: Path) -> None:
    """Delete what killed writes left in run ``path`` (temp files and folders, replaced folders, half-pruned
    checkpoints, --overwrite's trash) and beside it (``.NAME.old-*`` of earlier versions); call under the lock."""
    beside = [p for p in path.parent.glob(f".{glob.escape(path.name)}.old-*")
              if _OLD_BESIDE.fullmatch(p.name[len(path.name) + 1:])]
    stale = [*path.glob(".*.tmp"), *path.glob(".*.old-*"), *path.glob(TRASH_PREFIX + "*"),
             *path.glob("checkpoints/.*"), *path.glob("samples/.*.tmp"), *beside]
    for leftover in stale:
        if leftover.is_dir() and not leftover.is_symlink():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            leftover.unlink(missing_ok=True)


def write_run_info(path: Path, info: dict) -> None:
    import socket

    info = {**info, "pid": os.getpid(), "host": socket.gethostname(), "updated": time.strftime("%Y-%m-%dT%H:%M:%S")}
    save_json(path / RUN_MARKER, info)


def save_tuned_model(path: Path, model, peft: str, lora_rank: int | None = None) -> None:
    """Write ``model/`` (and ``adapter/`` for LoRA) atomically."""
    den = model.denoiser
    if peft == "lora":
        _save_adapter(path / "adapter", model, lora_rank)
        if sum(p.numel() for p in den.parameters()) > MERGE_LIMIT:
            return

        model = model.with_denoiser(merge_lora(copy.deepcopy(den)))
    with atomic_dir(path / "model") as tmp:
        model.save(tmp)


def _save_adapter(target: Path, model, rank: int | None) -> None:
    """``adapter/``: peft-format weights (what ``chaintune.load`` reads), plus diffusers' LoRA format
    where the backend's pipeline has a LoRA loader (``model.save_lora_weights``)."""
    from safetensors.torch import save_file

    sd = {k: v.detach().cpu().contiguous() for k, v in lora_state_dict(model.denoiser).items()}
    with atomic_dir(target) as tmp:
        save_file(sd, str(tmp / "adapter_model.safetensors"))
        # the adapted layers by name, so chaintune.load injects LoRA exactly where the run trained it
        layers = sorted({k.split(".lora_")[0] for k in sd})
        save_json(tmp / "adapter_config.json", {"r": rank, "peft_type": "LORA", "target_modules": layers})
        model.save_lora_weights(tmp, sd)
