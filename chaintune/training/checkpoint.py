"""Resumable training state, written atomically, safetensors + JSON only (no pickle).

``checkpoints/step_000050/`` holds the trainable weights, the optimizer's tensors and structure,
the LR schedule, every RNG state (torch, CUDA, numpy, python and the sampling generator) and the
trainer's counters. A checkpoint directory appears only when complete (temp dir, then rename), so
a crash or SIGKILL mid-write leaves the previous one intact; the last ``keep`` are kept.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from chaintune.errors import ChaintuneError
from chaintune.utils.io import atomic_dir, atomic_file, save_json


def _opt_split(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for idx, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"{idx}.{k}"] = v.detach().cpu().contiguous()
            else:
                scalars[f"{idx}.{k}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _opt_join(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for key, v in list(tensors.items()) + list(meta["scalars"].items()):
        idx, k = key.split(".", 1)
        state.setdefault(int(idx), {})[k] = v
    return {"state": state, "param_groups": meta["param_groups"]}


def save(run_dir: Path, step: int, module: torch.nn.Module, opt, lr_sched, gen: torch.Generator, state: dict,
         keep: int = 2, ema=None) -> Path:
    """Write ``checkpoints/step_NNNNNN``; ``state`` is the trainer's JSON-able counters and objective state."""
    root = Path(run_dir) / "checkpoints"
    target = root / f"step_{step:06d}"
    with atomic_dir(target) as tmp:
        weights = {n: p.detach().cpu().contiguous() for n, p in module.named_parameters() if p.requires_grad}
        save_file(weights, str(tmp / "trainable.safetensors"))
        ot, ometa = _opt_split(opt)
        save_file(ot, str(tmp / "optimizer.safetensors"))
        rng = {"torch": torch.get_rng_state(), "generator": gen.get_state()}
        if torch.cuda.is_available():
            for i, s in enumerate(torch.cuda.get_rng_state_all()):
                rng[f"cuda{i}"] = s
        save_file(rng, str(tmp / "rng.safetensors"))
        if ema is not None:
            save_file({f"ema.{i}": t.detach().cpu().contiguous() for i, t in enumerate(ema.shadow_params)},
                      str(tmp / "ema.safetensors"))
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


def _read(path: Path) -> tuple[dict, dict, dict, dict]:
    try:
        return (json.loads((path / "trainer.json").read_text()), load_file(str(path / "trainable.safetensors")),
                load_file(str(path / "optimizer.safetensors")), load_file(str(path / "rng.safetensors")))
    except Exception as e:  # truncated or corrupt files: the caller tries the previous checkpoint
        raise ChaintuneError(f"checkpoint {path} is corrupt: {e}") from e


def restore(run_dir: Path, module: torch.nn.Module, opt, lr_sched, gen: torch.Generator, state: dict,
            ema=None, warn=print) -> int | None:
    """Load the newest intact checkpoint into the given objects; returns its step, or None when the run
    has no checkpoint (it then starts over). A corrupt newest checkpoint is reported and the previous one
    used. Parameter names and shapes must match exactly (a different model or PEFT setting is refused)."""
    found = checkpoints(run_dir)
    if not found:
        return None
    for path in reversed(found):
        try:
            meta, weights, ot, rng = _read(path)
            break
        except ChaintuneError as e:
            warn(f"warning: {e}; trying the previous checkpoint")
    else:
        raise ChaintuneError(f"--resume: every checkpoint in {Path(run_dir) / 'checkpoints'} is corrupt")
    params = {n: p for n, p in module.named_parameters() if p.requires_grad}
    unknown, missing = sorted(set(weights) - set(params)), sorted(set(params) - set(weights))
    if unknown or missing:
        what = f"unknown parameter {unknown[0]!r}" if unknown else f"no value for parameter {missing[0]!r}"
        raise ChaintuneError(f"checkpoint {path} does not match the model ({what}); was the run made with another "
                             "model or PEFT setting?")
    for n, t in weights.items():
        if tuple(t.shape) != tuple(params[n].shape):
            raise ChaintuneError(f"checkpoint {path} does not match the model: {n} has shape {list(t.shape)} there "
                                 f"and {list(params[n].shape)} in the model")
    with torch.no_grad():
        for n, t in weights.items():
            params[n].copy_(t)
    opt.load_state_dict(_opt_join(ot, meta["optimizer"]))
    if lr_sched is not None and meta.get("lr_scheduler"):
        lr_sched.load_state_dict(meta["lr_scheduler"])
    torch.set_rng_state(rng["torch"])
    gen.set_state(rng["generator"])
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            if f"cuda{i}" in rng:
                torch.cuda.set_rng_state(rng[f"cuda{i}"], i)
    ns = meta["numpy_rng"]
    np.random.set_state((ns[0], np.array(ns[1], dtype=np.uint32), *ns[2:]))
    ps = meta["python_rng"]
    random.setstate((ps[0], tuple(ps[1]), ps[2]))
    state.update(meta.get("state") or {})
    if meta.get("estimator"):  # checkpoints of the previous version kept RLR's grad-norm table here
        state.setdefault("objective", {})["estimator_norms"] = meta["estimator"]
    if ema is not None and (path / "ema.safetensors").exists():
        e = load_file(str(path / "ema.safetensors"))
        with torch.no_grad():
            for i, t in enumerate(ema.shadow_params):
                t.copy_(e[f"ema.{i}"])
        if meta.get("ema_step") is not None:
            ema.optimization_step = meta["ema_step"]
    return int(meta["step"])


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
