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

import copy
import time
from pathlib import Path

from chaintune.backends.run_dir import RUN_MARKER, read_run_info
from chaintune.errors import ChaintuneError
from chaintune.utils.io import atomic_dir, save_json

__all__ = ["RUN_MARKER", "MERGE_LIMIT", "prepare_run_dir", "write_run_info", "read_run_info", "save_tuned_model"]

MERGE_LIMIT = 300_000_000  # parameters; above this only the adapter is written (a merged SD is GBs)


def prepare_run_dir(path: str | Path, *, overwrite: bool = False, resume: bool = False) -> Path:
    """Create ``path`` for a new run; refuse to clobber an existing run unless told."""
    path = Path(path)
    if path.exists() and any(path.iterdir()):
        if resume:
            return path
        if not overwrite:
            raise ChaintuneError(
                f"{path} already holds files; pass --resume to continue it or --overwrite to replace it")
        import shutil

        shutil.rmtree(path)
    elif resume:
        raise ChaintuneError(f"--resume: {path} does not exist")
    path.mkdir(parents=True, exist_ok=True)
    return path


def write_run_info(path: Path, info: dict) -> None:
    info = {**info, "updated": time.strftime("%Y-%m-%dT%H:%M:%S")}
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
