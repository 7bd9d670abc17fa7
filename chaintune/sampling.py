"""``chaintune.sample``: one sampler for every backend, built on :func:`chaintune.chain.run_chain`."""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence

import torch

from chaintune.backends.base import Conditions, DiffusionModel
from chaintune.chain import StepGrad, Trajectory, is_flow_scheduler, make_scheduler, run_chain
from chaintune.errors import ChaintuneError
from chaintune.utils.devices import free_bytes
from chaintune.utils.progress import progress as progress_bar


def chain_scheduler(model: DiffusionModel, scheduler: str | object | None = "ddim"):
    """The scheduler a chain runs with: ``'ddim'`` (eta-controlled), ``'ddpm'``, an instance, or
    ``None`` for the model's own.

    Flow-matching models (a ``FlowMatchEulerDiscreteScheduler``) have no DDIM/DDPM form: any string
    kind ('ddim', 'ddpm', 'flow') gives their FlowMatchEulerDiscreteScheduler, run as an SDE whose noise level is
    ``eta`` (eta = 0 is the pipeline's Euler sampler), so trainers keep their 'ddim' default.
    """
    if scheduler is None:
        return model.scheduler
    if isinstance(scheduler, str) and is_flow_scheduler(model.scheduler):
        return copy.deepcopy(model.scheduler)  # keeps what a config cannot say (FLUX: chain_mu, its sigma grid)
    if isinstance(scheduler, str):
        return make_scheduler(scheduler, model.scheduler.config)
    return scheduler


def make_conditions(
    model: DiffusionModel,
    n: int,
    *,
    labels: Sequence[int] | torch.Tensor | int | None = None,
    prompts: Sequence[str] | str | None = None,
    guidance_scale: float | None = None,
    generator: torch.Generator | None = None,
) -> Conditions:
    """Per-sample conditions for ``n`` samples (a single label/prompt is repeated)."""
    cond = model.default_conditions(n, generator=generator)
    if labels is not None:
        if not model.takes_labels:
            raise ChaintuneError(f"{model.kind} model {model.source!r} is not class-conditional; drop labels")
        t = torch.as_tensor(labels, dtype=torch.long).flatten()
        if t.numel() == 1:
            t = t.repeat(n)
        if t.numel() != n:
            raise ChaintuneError(f"got {t.numel()} labels for {n} samples")
        if int(t.min()) < 0 or int(t.max()) >= model.num_classes:
            raise ChaintuneError(f"labels must be in [0, {model.num_classes - 1}]")
        cond.labels = t
    if prompts is not None:
        if not model.takes_prompts:
            what = "class labels" if model.takes_labels else "no conditions"
            raise ChaintuneError(f"{model.kind} model {model.source!r} takes {what}, not prompts")
        p = [prompts] if isinstance(prompts, str) else list(prompts)
        if len(p) == 1:
            p = p * n
        if len(p) != n:
            raise ChaintuneError(f"got {len(p)} prompts for {n} samples")
        cond.prompts = p
    if guidance_scale is not None:
        cond.guidance_scale = float(guidance_scale)
    return cond


def initial_noise(model: DiffusionModel, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    x = torch.randn((n, *model.latent_shape), generator=generator)
    return x.to(device=model.device, dtype=model.dtype)


def sample(
    model: DiffusionModel,
    n: int,
    steps: int = 50,
    eta: float = 1.0,
    generator: torch.Generator | None = None,
    *,
    labels=None,
    prompts=None,
    guidance_scale: float | None = None,
    scheduler: str | object | None = "ddim",
    batch_size: int | None = None,
    decode: bool = True,
    progress: str | None = None,
    conditions: Conditions | None = None,
) -> Trajectory:
    """Sample ``n`` images without gradients and return the full trajectory.

    ``eta`` is DDIM's noise level (1.0 = DDPM-like variance, 0.0 = deterministic; log-probs are
    NaN there since the transition is a point mass). ``scheduler='ddpm'`` uses the DDPM
    posterior variance instead and ignores ``eta``. ``batch_size`` splits large ``n`` into
    chunks to bound memory (the noise is drawn chunk by chunk, so results depend on it).
    ``progress``: a label for a progress bar over the model calls (long sampling phases of trainers).
    ``conditions``: the batch's conditions as they are (e.g. a ControlNet's control images), instead of
    ``labels``/``prompts``/``guidance_scale``.
    """
    if n < 1:
        raise ChaintuneError("n must be >= 1")
    sched = chain_scheduler(model, scheduler)
    cond = conditions if conditions is not None else make_conditions(
        model, n, labels=labels, prompts=prompts, guidance_scale=guidance_scale, generator=generator)
    x_T = initial_noise(model, n, generator)
    bs = batch_size or n
    parts = []
    bar = None
    if progress:
        bar = progress_bar(desc=progress, total=steps * -(-n // bs), leave=False, unit="step")
    with torch.no_grad():
        for s in range(0, n, bs):
            idx = list(range(s, min(n, s + bs)))
            c = cond.subset(idx)
            denoise = model.denoise_fn(c)
            if bar is not None:
                denoise = _ticking(denoise, bar)
            traj = run_chain(denoise, sched, x_T[idx], num_steps=steps, eta=eta, generator=generator,
                             modes=StepGrad.NONE)
            if decode:
                traj.images = model.decode(traj.x0)
            traj.conditions = {"labels": c.labels, "prompts": c.prompts}
            parts.append(traj)
    if bar is not None:
        bar.close()
    return parts[0] if len(parts) == 1 else _concat(parts)


def _ticking(denoise, bar):
    """``denoise`` that advances ``bar`` once per model call."""

    def fn(x, t):
        out = denoise(x, t)
        bar.update(1)
        return out

    return fn


def _concat(parts: list[Trajectory]) -> Trajectory:
    first = parts[0]
    cat = lambda xs: torch.cat(xs)  # noqa: E731
    labels = [p.conditions["labels"] for p in parts]
    prompts = [p.conditions["prompts"] for p in parts]
    return Trajectory(
        latents=[cat([p.latents[i] for p in parts]) for i in range(len(first.latents))],
        timesteps=first.timesteps,
        means=[cat([p.means[i] for p in parts]) for i in range(len(first.means))],
        stds=first.stds,
        noises=[cat([p.noises[i] for p in parts]) for i in range(len(first.noises))],
        log_probs=cat([p.log_probs for p in parts]),
        stochastic=first.stochastic,
        x0=cat([p.x0 for p in parts]),
        pred_x0=[cat([p.pred_x0[i] for p in parts]) for i in range(len(first.pred_x0))],
        eta=first.eta,
        images=None if first.images is None else cat([p.images for p in parts]),
        conditions={
            "labels": None if labels[0] is None else cat(labels),
            "prompts": None if prompts[0] is None else sum(prompts, []),
        },
    )


def check_conditions(m, *, label: int | None, prompt: str | None, steps: int) -> None:
    """--label/--prompt/--steps against what the loaded model takes."""
    if label is not None:
        if not m.takes_labels:
            raise ChaintuneError(f"{m.kind} model {m.source!r} is not class-conditional; drop --label")
        if not 0 <= label < m.num_classes:
            raise ChaintuneError(f"--label must be in 0..{m.num_classes - 1} for {m.source!r}, got {label}")
    if prompt is not None and not m.takes_prompts:
        what = "class labels (--label)" if m.takes_labels else "no conditions"
        raise ChaintuneError(f"{m.kind} model {m.source!r} takes {what}, not prompts; drop --prompt")
    config = getattr(m.scheduler, "config", None)
    limit = config.get("num_train_timesteps") if hasattr(config, "get") else None
    if isinstance(limit, int) and steps > limit:
        raise ChaintuneError(f"--steps must be at most {limit} (the model's training timesteps), got {steps}")


def check_sample_memory(m, num: int, steps: int) -> None:
    """Refuse a --num whose samples cannot be held in memory: ``chaintune.sample`` keeps every sample's whole chain
    (latents, means, noise and x0-predictions of each of the ``steps`` steps) and its image until they are written,
    so the count is bounded by the free memory of the device the model is on."""
    free = free_bytes(m.device)
    if free is None:
        return
    latent = math.prod(m.latent_shape) * torch.finfo(m.dtype).bits // 8
    image = math.prod(m.pixel_shape) * 4 * (getattr(m, "num_frames", 1) if m.produces_video else 1)
    need = num * ((4 * steps + 2) * latent + image)
    if need > free:
        fits = max(0, free // ((4 * steps + 2) * latent + image))
        raise ChaintuneError(f"--num {num} needs about {need / 2**30:,.1f} GiB to hold the samples' chains at --steps "
                             f"{steps}, and {free / 2**30:,.1f} GiB is free on {m.device}; sample at most {fits} at "
                             "a time (into several --out folders, with different --seed)")
