"""``--compile``: torch.compile the denoiser, and keep it only where its gradients equal eager's.

A compiler bug must not change a run's results. ``torch.compile`` is applied in place
(``nn.Module.compile``: parameter names, ``state_dict``, adapters and ``save_pretrained`` are untouched),
then one forward and backward pass of the run's own denoiser closure, at the run's micro-batch size and
precision, is computed twice — compiled and with the compiler forced off — and every trainable tensor's
gradient is compared. If any differs beyond float tolerance the module is restored to eager with a warning that
names the worst tensor.

Measured (docs/results.md, "Compile"; benchmarks/compile.py): on this project's CPU machine (torch 2.13) the
UNet2DModel of ``builtin:digits`` compiled cold in one to two minutes and then ran its forward and backward at parity
with eager (alternating calls in one process, batch 32, one thread), and inductor's fused backward kernels gave wrong
gradients for it (relative error ~1 on some tensors, 0.4 on the input gradient; right with ``max_fusion_size = 1``
and with aot_eager) — the check below catches exactly this. Compile is for GPUs, where the denoiser's many small
kernels are what it fuses.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch

from chaintune.backends.base import DiffusionModel
from chaintune.chain import prepare_scheduler
from chaintune.run.config import COMPILE_BACKENDS
from chaintune.utils.gradcheck import gradient_mismatch

__all__ = ["COMPILE_BACKENDS", "compile_denoiser", "gradient_mismatch"]

RTOL = {torch.float32: 1e-3, torch.float64: 1e-6}  # fp32: reassociated sums agree to ~1e-6; a bug is O(1)
RTOL_LOW = 5e-2  # fp16 / bf16 (autocast): kernels round differently


def _probe_gradients(model: DiffusionModel, n: int, autocast: Callable[[], contextlib.AbstractContextManager],
                     seed: int = 0) -> dict[str, torch.Tensor]:
    """Gradients of a fixed random projection of one guided denoiser call at a mid-chain timestep, in eval mode
    (dropout and DiT's label drop draw random numbers that compiled code draws differently)."""
    mode = model.denoiser.training
    model.denoiser.eval()
    try:
        return _gradients(model, n, autocast, seed)
    finally:
        model.denoiser.train(mode)


def _gradients(model: DiffusionModel, n: int, autocast, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    cond = model.default_conditions(n, gen)
    if model.needs_control:
        cond.control = torch.rand(n, *model.pixel_shape, generator=gen)
    x = torch.randn(n, *model.latent_shape, generator=gen).to(model.device, model.dtype)
    t = prepare_scheduler(model.scheduler, 10, device=model.device).timesteps[5]
    params = [(k, p) for k, p in model.denoiser.named_parameters() if p.requires_grad]
    with autocast():
        out = model.denoise_fn(cond)(x, t)
    w = torch.randn(out.shape, generator=gen).to(out.device, torch.float32)
    grads = torch.autograd.grad((out.float() * w).sum(), [p for _, p in params], allow_unused=True)
    return {k: (g if g is not None else torch.zeros_like(p)).detach().float()
            for (k, p), g in zip(params, grads, strict=True)}


def compile_denoiser(model: DiffusionModel, backend: str, *, batch_size: int,
                     autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
                     low_precision: bool = False, warn: Callable[[str], None] = print) -> bool:
    """Compile ``model.denoiser`` in place with ``backend``; returns whether it stays compiled.

    The check runs at ``batch_size`` (the run's micro-batch, so the checked kernels are the ones training runs).
    """
    if backend == "none":
        return False
    den = model.denoiser
    eager = _probe_gradients(model, batch_size, autocast)
    den.compile(backend=backend)
    try:
        compiled = _probe_gradients(model, batch_size, autocast)
    except Exception as e:  # the compiler failed on this model: a compiler limitation, not the user's input
        _uncompile(den)
        warn(f"warning: torch.compile (backend {backend}) failed on this model ({type(e).__name__}: "
             f"{str(e).splitlines()[0] if str(e) else ''}); running eager")
        return False
    rtol = RTOL_LOW if low_precision else RTOL.get(model.dtype, RTOL_LOW)
    bad = gradient_mismatch(eager, compiled, rtol)
    if bad is not None:
        _uncompile(den)
        warn(f"warning: torch.compile (backend {backend}) changed the denoiser's gradients (worst: {bad[0]}, "
             f"relative error {bad[1]:.2g} > {rtol:g}): a compiler bug; running eager, results unchanged")
        return False
    return True


def _uncompile(module: torch.nn.Module) -> None:
    """Undo ``nn.Module.compile`` (it only sets ``_compiled_call_impl``)."""
    module._compiled_call_impl = None
