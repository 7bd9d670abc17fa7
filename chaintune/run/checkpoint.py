"""Resumable training state, written atomically, safetensors + JSON only (no pickle).

``checkpoints/step_000050/`` holds the trainable weights, the optimizer's tensors and structure,
the LR schedule, every RNG state (torch, CUDA, numpy, python and the sampling generator) and the
trainer's counters. A checkpoint directory appears only when complete (temp dir, then rename), so
a crash or SIGKILL mid-write leaves the previous one intact; the last ``keep`` are kept.

Several processes: every process calls :func:`save` (only the one with ``write=True`` writes) and
:func:`restore`. The sampling generator and torch RNG of every process are kept (``generator.R``), so
each continues its own stream. Sharded (FSDP2) parameters, optimizer moments and EMA weights are
gathered into full tensors, so a sharded run writes what an unsharded one would (either resumes the
other); on restore each process reads the full tensors one at a time and keeps its shard.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from chaintune.distributed import gather_full, is_sharded, local_shard, rank_world
from chaintune.errors import ChaintuneError
from chaintune.utils.io import atomic_dir, atomic_file, save_json


def _cpu(t: torch.Tensor, keep: bool = True) -> torch.Tensor | None:
    """``t`` in full on the CPU (gathered if sharded: a collective); None where ``keep`` is False (after
    taking part in the gather)."""
    full = gather_full(t.detach())
    return full.cpu().contiguous() if keep else None


def _opt_split(opt: torch.optim.Optimizer, keep: bool = True) -> tuple[dict[str, torch.Tensor], dict]:
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for idx, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"{idx}.{k}"] = _cpu(v, keep)
            else:
                scalars[f"{idx}.{k}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _opt_join(tensors, meta: dict, place=None) -> dict:
    """The optimizer state dict from its tensors and JSON part; ``place(idx, tensor)`` (if given) turns each
    tensor into what the optimizer holds (its shard)."""
    state: dict[int, dict] = {}
    for key in tensors.keys():
        idx, k = key.split(".", 1)
        v = tensors[key]
        state.setdefault(int(idx), {})[k] = v if place is None else place(int(idx), v)
    for key, v in meta["scalars"].items():
        idx, k = key.split(".", 1)
        state.setdefault(int(idx), {})[k] = v
    return {"state": state, "param_groups": meta["param_groups"]}


def _rank_rngs(gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Every process's sampling generator and torch RNG (``generator.R``, ``torch.R``); a collective when there
    are several processes, ``{}`` with one."""
    rank, world = rank_world()
    if world == 1:
        return {}
    seen: list = [None] * world
    torch.distributed.all_gather_object(seen, (gen.get_state(), torch.get_rng_state()))
    out = {}
    for r, (g, t) in enumerate(seen):
        out[f"generator.{r}"], out[f"torch.{r}"] = g, t
    return out


def save(run_dir: Path, step: int, module: torch.nn.Module, opt, lr_sched, gen: torch.Generator, state: dict,
         keep: int = 2, ema=None, *, write: bool = True) -> Path | None:
    """Write ``checkpoints/step_NNNNNN``; ``state`` is the trainer's JSON-able counters and objective state.

    With several processes, or sharded parameters, this is a collective: every process calls it, and only
    the one with ``write=True`` (the main process) writes; the others return None."""
    rank_rngs = _rank_rngs(gen)
    if not write and not any(is_sharded(p) for p in module.parameters()):
        return None  # nothing to gather: the writer has everything
    root = Path(run_dir) / "checkpoints"
    target = root / f"step_{step:06d}"
    with (atomic_dir(target) if write else contextlib.nullcontext()) as tmp:
        # one file at a time: sharded, the writer holds one gathered part (weights, then moments) at once
        weights = {n: _cpu(p, write) for n, p in module.named_parameters() if p.requires_grad}
        if write:
            save_file(weights, str(tmp / "trainable.safetensors"))
        del weights
        ot, ometa = _opt_split(opt, write)
        if write:
            save_file(ot, str(tmp / "optimizer.safetensors"))
        del ot
        if ema is not None:
            ema_t = {f"ema.{i}": _cpu(t, write) for i, t in enumerate(ema.shadow_params)}
            if write:
                save_file(ema_t, str(tmp / "ema.safetensors"))
            del ema_t
        if not write:
            return None
        rng = {"torch": torch.get_rng_state(), "generator": gen.get_state(), **rank_rngs}
        if torch.cuda.is_available():
            for i, s in enumerate(torch.cuda.get_rng_state_all()):
                rng[f"cuda{i}"] = s
        save_file(rng, str(tmp / "rng.safetensors"))
        np_state = np.random.get_state()
        py_state = random.getstate()
        save_json(tmp / "trainer.json", {
            "step": step,
            "optimizer": ometa,
            "lr_scheduler": lr_sched.state_dict() if lr_sched is not None else None,
            "numpy_rng": [np_state[0], np_state[1].tolist(), *np_state[2:]],
            "python_rng": [py_state[0], list(py_state[1]), py_state[2]],
            "state": state,
            "ema_step": getattr(ema, "optimization_step", None),  # drives the EMA's decay warm-up
        })
    ckpts = sorted(p for p in root.glob("step_*") if p.is_dir())
    for old in ckpts[:-keep] if keep > 0 else []:
        # rename first (atomic): a kill mid-delete leaves a hidden leftover, never a half checkpoint under
        # a step_* name; leftovers are removed when the run is next opened
        doomed = old.with_name(f".{old.name}.deleting")
        os.replace(old, doomed)
        shutil.rmtree(doomed, ignore_errors=True)
    return target


def checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (a directory appears only once fully written)."""
    return sorted(p for p in (Path(run_dir) / "checkpoints").glob("step_*") if (p / "trainer.json").exists())


def latest(run_dir: Path) -> Path | None:
    ckpts = checkpoints(run_dir)
    return ckpts[-1] if ckpts else None


class _Lazy:
    """A safetensors file read one tensor at a time (a sharded run keeps only its shard of each)."""

    def __init__(self, path: Path):
        self._f = safe_open(str(path), framework="pt")  # checks the header against the file size (truncation)

    def keys(self) -> list[str]:
        return list(self._f.keys())

    def __iter__(self):
        return iter(self.keys())

    def __getitem__(self, key: str) -> torch.Tensor:
        return self._f.get_tensor(key)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._f.get_slice(key).get_shape())


def _load(path: Path, lazy: bool):
    return _Lazy(path) if lazy else load_file(str(path))


def _shape(tensors, key: str) -> tuple[int, ...]:
    return tensors.shape(key) if isinstance(tensors, _Lazy) else tuple(tensors[key].shape)


def _read(path: Path, lazy: bool = False) -> tuple[dict, dict, dict, dict]:
    try:
        return (json.loads((path / "trainer.json").read_text()), _load(path / "trainable.safetensors", lazy),
                _load(path / "optimizer.safetensors", lazy), load_file(str(path / "rng.safetensors")))
    except Exception as e:  # truncated or corrupt files: the caller tries the previous checkpoint
        raise ChaintuneError(f"checkpoint {path} is corrupt: {e}") from e


def restore(run_dir: Path, module: torch.nn.Module, opt, lr_sched, gen: torch.Generator, state: dict,
            ema=None, warn=print) -> int | None:
    """Load the newest intact checkpoint into the given objects; returns its step, or None when the run
    has no checkpoint (it then starts over). A corrupt newest checkpoint is reported and the previous one
    used. Parameter names and shapes must match exactly (a different model or PEFT setting is refused).

    Several processes: every process calls it; each takes its own RNG streams (``generator.R``) and, for sharded
    parameters, its shard of every full tensor."""
    found = checkpoints(run_dir)
    if not found:
        return None
    params = {n: p for n, p in module.named_parameters() if p.requires_grad}
    lazy = any(is_sharded(p) for p in params.values())
    for path in reversed(found):
        try:
            meta, weights, ot, rng = _read(path, lazy)
            break
        except ChaintuneError as e:
            warn(f"warning: {e}; trying the previous checkpoint")
    else:
        raise ChaintuneError(f"--resume: every checkpoint in {Path(run_dir) / 'checkpoints'} is corrupt")
    unknown, missing = sorted(set(weights.keys()) - set(params)), sorted(set(params) - set(weights.keys()))
    if unknown or missing:
        what = f"unknown parameter {unknown[0]!r}" if unknown else f"no value for parameter {missing[0]!r}"
        raise ChaintuneError(f"checkpoint {path} does not match the model ({what}); was the run made with another "
                             "model or PEFT setting?")
    for n in weights.keys():
        if _shape(weights, n) != tuple(params[n].shape):
            raise ChaintuneError(f"checkpoint {path} does not match the model: {n} has shape "
                                 f"{list(_shape(weights, n))} there and {list(params[n].shape)} in the model")
    with torch.no_grad():
        for n in weights.keys():
            params[n].copy_(local_shard(weights[n], params[n]))  # a sharded parameter keeps its shard
    by_index = [p for group in opt.param_groups for p in group["params"]]  # the optimizer state's indices

    def place(idx: int, t: torch.Tensor) -> torch.Tensor:
        p = by_index[idx] if idx < len(by_index) else None
        return local_shard(t, p) if p is not None and is_sharded(p) and tuple(t.shape) == tuple(p.shape) else t

    opt.load_state_dict(_opt_join(ot, meta["optimizer"], place))
    if lr_sched is not None and meta.get("lr_scheduler"):
        lr_sched.load_state_dict(meta["lr_scheduler"])
    _restore_rngs(rng, gen, warn)
    _restore_host_rngs(rng, meta)
    state.update(meta.get("state") or {})
    if meta.get("estimator"):  # checkpoints of the previous version kept RLR's grad-norm table here
        state.setdefault("objective", {})["estimator_norms"] = meta["estimator"]
    if ema is not None and (path / "ema.safetensors").exists():
        _restore_ema(ema, _load(path / "ema.safetensors", lazy), meta.get("ema_step"))
    return int(meta["step"])


def _restore_host_rngs(rng: dict[str, torch.Tensor], meta: dict) -> None:
    """The CUDA, numpy and python generators as the checkpoint left them."""
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            if f"cuda{i}" in rng:
                torch.cuda.set_rng_state(rng[f"cuda{i}"], i)
    ns = meta["numpy_rng"]
    np.random.set_state((ns[0], np.array(ns[1], dtype=np.uint32), *ns[2:]))
    ps = meta["python_rng"]
    random.setstate((ps[0], tuple(ps[1]), ps[2]))


def _restore_ema(ema, saved, step: int | None) -> None:
    """The EMA's shadow weights (each process's shard when sharded) and its step (it drives the decay warm-up)."""
    with torch.no_grad():
        for i, t in enumerate(ema.shadow_params):
            t.copy_(local_shard(saved[f"ema.{i}"], t))
    if step is not None:
        ema.optimization_step = step


def _restore_rngs(rng: dict[str, torch.Tensor], gen: torch.Generator, warn) -> None:
    """This process's sampling generator and torch RNG: its own (``generator.R``) when the checkpoint has it; a
    one-process checkpoint's on rank 0, while the other processes keep their fresh seeds."""
    rank, world = rank_world()
    saved = sum(k.startswith("generator.") for k in rng)
    if world > 1 and saved != world and rank == 0:
        warn(f"warning: the checkpoint was written by {max(saved, 1)} process(es) and is resumed on {world}: every "
             "process continues a sample stream of its own, but not the ones an uninterrupted run would draw")
    own = rng.get(f"generator.{rank}")
    if own is not None:
        gen.set_state(own)
        torch.set_rng_state(rng[f"torch.{rank}"])
    elif rank == 0:
        gen.set_state(rng["generator"])
        torch.set_rng_state(rng["torch"])


def save_config(run_dir: Path, config: dict) -> None:
    import yaml

    with atomic_file(Path(run_dir) / "config.yaml") as f:
        yaml.safe_dump(config, f, sort_keys=False)


def truncate_metrics(run_dir: Path, step: int) -> None:
    """Drop rows logged after the checkpoint we resume from (they will be logged again)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                keep.append(line)
        except json.JSONDecodeError:  # a line cut by the kill
            continue
    with atomic_file(path) as f:
        f.write("".join(k + "\n" for k in keep))
