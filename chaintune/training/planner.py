"""Memory planner: measure one half-order step and one zeroth-order step, then choose h (paper Sec. 6).

    h* = min( floor((B - B_z (T - 1)) / (B_h - B_z)),  floor(T V_z / (2 (V_z - V_h)) - 1) )

B is the budget left for the chain after the fixed cost (weights, trainable copies, optimizer
state). B_h is the memory one step adds when it keeps its graph (activations saved for backward),
B_z what a zeroth-order step keeps (its latents, mean and noise, stored for the estimate). On CUDA
both are measured with the allocator's peak; on CPU, B_h is the exact byte count of tensors saved
for backward (``saved_tensors_hooks``) and B_z the bytes stored per step. The variance bound is
applied only when variances are given (``benchmarks/estimators.py`` measures them); otherwise
memory decides, as the paper notes it does in practice.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from chaintune.errors import ChaintuneError

_UNITS = {"b": 1, "kb": 2**10, "mb": 2**20, "gb": 2**30, "tb": 2**40, "kib": 2**10, "mib": 2**20, "gib": 2**30}


def parse_bytes(text: str) -> int:
    m = re.fullmatch(r"\s*([0-9.]+)\s*([a-zA-Z]*)\s*", str(text))
    if not m or (m.group(2).lower() or "b") not in _UNITS:
        raise ChaintuneError(f"cannot read memory budget {text!r}; write e.g. 24GB or 512MB")
    return int(float(m.group(1)) * _UNITS[(m.group(2).lower() or "b")])


@dataclass
class MemoryPlan:
    device: str
    budget: int
    fixed: int
    b_h: int
    b_z: int
    steps: int
    batch_size: int
    h_star: int
    fits: bool
    max_batch_h2: int
    checkpointing: bool


def _fmt(b: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(b) < 1024 or unit == "TB":
            return f"{b:.1f} {unit}"
        b /= 1024
    return f"{b:.1f} TB"


def measure_step(model, batch_size: int, checkpoint: bool) -> tuple[int, int]:
    """(B_h, B_z) in bytes for one chain step of ``batch_size`` samples."""
    from chaintune.sampling import initial_noise

    cond = model.default_conditions(batch_size)
    x = initial_noise(model, batch_size).requires_grad_(True)
    t = torch.tensor(int(model.scheduler.config.num_train_timesteps) // 2, device=x.device)
    fn = model.denoise_fn(cond)
    latent_bytes = x.numel() * x.element_size()
    b_z = 3 * latent_bytes  # latents, mean and noise kept per step
    if x.device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        if checkpoint:
            out = torch.utils.checkpoint.checkpoint(fn, x, t, use_reentrant=False)
        else:
            out = fn(x, t)
        b_h = torch.cuda.memory_allocated() - base
        del out
        return max(b_h, b_z + 1), b_z
    saved = [0]

    def pack(tensor):
        saved[0] += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tt: tt):
        if checkpoint:
            out = torch.utils.checkpoint.checkpoint(fn, x, t, use_reentrant=False)
        else:
            out = fn(x, t)
    b_h = saved[0] + out.numel() * out.element_size() + b_z
    return b_h, b_z


def h_star(budget_left: int, b_h: int, b_z: int, steps: int, v_h: float | None = None,
           v_z: float | None = None) -> int:
    mem = (budget_left - b_z * (steps - 1)) // max(1, b_h - b_z)
    h = int(mem)
    if v_h is not None and v_z is not None and v_z > v_h:
        h = min(h, int(steps * v_z / (2 * (v_z - v_h)) - 1))
    return max(0, min(h, steps - 1))


def plan_memory(model_id: str, budget: str | int, sample_steps: int = 50, batch_size: int = 1, peft: str = "lora",
                device: str | None = None, v_h: float | None = None, v_z: float | None = None) -> MemoryPlan:
    import chaintune
    from chaintune.training.adapters import apply_peft

    dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
    budget_b = parse_bytes(budget) if isinstance(budget, str) else int(budget)
    model = chaintune.load(model_id, device=dev)
    apply_peft(model.denoiser, peft)
    weights = sum(p.numel() * p.element_size() for m in model.modules().values() for p in m.parameters())
    trainable = sum(p.numel() * p.element_size() for p in model.denoiser.parameters() if p.requires_grad)
    fixed = weights + 4 * trainable  # grads, two Adam moments, one perturbation copy
    left = budget_b - fixed
    if left <= 0:
        raise ChaintuneError(f"memory budget {_fmt(budget_b)} is below the model's fixed cost {_fmt(fixed)} "
                             f"(weights + optimizer state); use --peft lora or a larger budget")
    ckpt = False
    b_h, b_z = measure_step(model, batch_size, checkpoint=False)
    h = h_star(left, b_h, b_z, sample_steps, v_h, v_z)
    if h < 1:
        ckpt = True
        b_h, b_z = measure_step(model, batch_size, checkpoint=True)
        h = h_star(left, b_h, b_z, sample_steps, v_h, v_z)
    # largest batch for which h = 2 fits (memory scales linearly with the batch)
    per_sample = (2 * b_h + (sample_steps - 1) * b_z) / batch_size
    max_batch = int(left // per_sample) if per_sample > 0 else 0
    return MemoryPlan(device=dev, budget=budget_b, fixed=fixed, b_h=b_h, b_z=b_z, steps=sample_steps,
                      batch_size=batch_size, h_star=h, fits=h >= 1, max_batch_h2=max_batch, checkpointing=ckpt)


def format_plan(p: MemoryPlan) -> str:
    lines = [
        f"device               {p.device}",
        f"budget               {_fmt(p.budget)}",
        f"fixed (weights+opt)  {_fmt(p.fixed)}",
        f"B_h (one HO step)    {_fmt(p.b_h)}   batch {p.batch_size}",
        f"B_z (one ZO step)    {_fmt(p.b_z)}",
        f"T                    {p.steps}",
        f"gradient ckpt        {'yes' if p.checkpointing else 'no'}",
        f"h*                   {p.h_star}" + ("" if p.fits else "   (does not fit: lower batch or steps)"),
        f"max batch at h=2     {p.max_batch_h2}",
        f"suggested flags      --estimator rlr --h {max(1, min(p.h_star, 2))} --batch-size "
        f"{max(1, min(p.max_batch_h2, 64))}" + (" --gradient-checkpointing" if p.checkpointing else ""),
    ]
    if not p.fits:
        raise ChaintuneError("memory budget too small for even one half-order step:\n" + "\n".join(lines))
    return "\n".join(lines)
