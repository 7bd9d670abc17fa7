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
      checkpoints/         resumable training state (see chaintune.training.checkpoint)
      tb/                  tensorboard logs

``chaintune.load("runs/X")`` loads ``model/`` when present, else the base model plus ``adapter/``
(that reading side lives in :mod:`chaintune.backends.run_dir`; ``RUN_MARKER`` and ``read_run_info``
are re-exported here).
"""

from __future__ import annotations

import contextlib
import copy
import os
import shutil
import tempfile
import time
from pathlib import Path

from chaintune.backends.run_dir import RUN_MARKER, read_run_info
from chaintune.errors import ChaintuneError
from chaintune.utils.io import atomic_dir, save_json

__all__ = ["RUN_MARKER", "RUN_ENTRIES", "MERGE_LIMIT", "RunLock", "check_run_dir", "prepare_run_dir", "write_run_info",
           "read_run_info", "save_tuned_model"]

MERGE_LIMIT = 300_000_000  # parameters; above this only the adapter is written (a merged SD is GBs)


# what a run directory may hold: ``--overwrite`` deletes a folder only when it holds nothing else
RUN_ENTRIES = frozenset({RUN_MARKER, "config.yaml", "metrics.jsonl", "model", "adapter", "best", "samples",
                         "checkpoints", "tb", "report.html"})


def check_run_dir(path: str | Path, *, overwrite: bool = False, resume: bool = False) -> None:
    """Everything that can be said about ``path`` before a model is loaded or a file written.

    ``--overwrite`` replaces only a recognisable chaintune run (its marker file, nothing but run entries),
    never the working directory or one of its parents; ``--resume`` needs a run.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ChaintuneError(f"{path} is a file; --out names a run directory")
    busy = path.is_dir() and any(path.iterdir())
    if resume:
        if not (path / RUN_MARKER).is_file():
            raise ChaintuneError(f"--resume: {path} is not a chaintune run (no {RUN_MARKER})")
        return
    if not busy:
        return
    if not overwrite:
        raise ChaintuneError(f"{path} already holds files; pass --resume to continue it or --overwrite to replace it")
    here = Path.cwd().resolve()
    if path.resolve() == here or path.resolve() in here.parents:
        raise ChaintuneError(f"--overwrite will not delete {path}: it is the working directory or one of its parents")
    if not (path / RUN_MARKER).is_file():
        raise ChaintuneError(f"--overwrite deletes only chaintune runs; {path} has no {RUN_MARKER}, so its files are "
                             "left alone (choose another --out)")
    others = sorted(e.name for e in path.iterdir() if e.name not in RUN_ENTRIES and not e.name.startswith("."))
    if others:
        raise ChaintuneError(f"--overwrite will not delete {path}: it holds files that are not part of a run "
                             f"({', '.join(others[:3])}{', ...' if len(others) > 3 else ''})")


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
    if overwrite and not resume and any(path.iterdir()):
        trash = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.old-"))
        for entry in list(path.iterdir()):
            os.replace(entry, trash / entry.name)  # the run disappears at once; deleting may take a while
        shutil.rmtree(trash, ignore_errors=True)
    for leftover in [*path.glob(".*.tmp"), *path.glob("checkpoints/.*")]:
        if leftover.is_dir():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            leftover.unlink(missing_ok=True)
    return lock


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
        from chaintune.training.adapters import merge_lora

        model = model.with_denoiser(merge_lora(copy.deepcopy(den)))
    with atomic_dir(path / "model") as tmp:
        model.save(tmp)


def _save_adapter(target: Path, model, rank: int | None) -> None:
    """``adapter/``: peft-format weights (what ``chaintune.load`` reads), plus diffusers' LoRA format
    where the backend's pipeline has a LoRA loader (``model.save_lora_weights``)."""
    from safetensors.torch import save_file

    from chaintune.training.adapters import lora_state_dict

    sd = {k: v.detach().cpu().contiguous() for k, v in lora_state_dict(model.denoiser).items()}
    with atomic_dir(target) as tmp:
        save_file(sd, str(tmp / "adapter_model.safetensors"))
        save_json(tmp / "adapter_config.json", {"r": rank, "peft_type": "LORA"})
        model.save_lora_weights(tmp, sd)
