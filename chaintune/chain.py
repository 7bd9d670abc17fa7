"""The denoising chain: the only module in chaintune that talks to schedulers.

A reverse step is a Gaussian transition

    x_{t-1} = mean_theta(x_t, t) + std_t * z_t,        z_t ~ N(0, I)

with ``mean`` and ``std`` computed here from a scheduler's noise schedule exactly as diffusers'
``DDPMScheduler.step`` / ``DDIMScheduler.step`` compute ``prev_sample`` (same formulas, same
clipping, same prediction types), so that a chain step equals ``scheduler.step(...).prev_sample``
for the same model output, sample and noise. Because mean and std are explicit, the exact
log-density log p_theta(x_{t-1} | x_t) is available for every stochastic step.

Every step is run in one of four gradient modes (:class:`StepGrad`); gradient estimators are
nothing but a choice of mode per step plus a surrogate loss (see ``chaintune.estimators``):

* ``NONE``        no graph (``torch.no_grad``); the input is detached.
* ``PATHWISE``    graph kept through the model call and the reparameterised sample, so the
                  next step and the reward can backpropagate into this step's parameters.
* ``LIKELIHOOD``  the sample is detached, but ``log p(x_{t-1} | x_t)`` keeps a graph to the
                  parameters (and to ``x_t`` if the previous step was pathwise: that is the
                  half-order estimator's span).
* ``PERTURBED``   no graph, run inside a caller-supplied context (zeroth-order estimators
                  perturb the parameters there and restore them on exit).

Steps are indexed by chain position ``i = 0 .. T-1`` (``i = 0`` is the first, noisiest step). The
paper's "step t" (t = 1 nearest the data) is chain position ``T - t``.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import Enum

import torch
from diffusers import DDIMScheduler, DDPMScheduler, FlowMatchEulerDiscreteScheduler
from torch.utils.checkpoint import checkpoint as _checkpoint

from chaintune.errors import ChaintuneError

__all__ = [
    "StepGrad",
    "Trajectory",
    "DeterministicStepError",
    "make_scheduler",
    "as_chain_scheduler",
    "prepare_scheduler",
    "transition",
    "gaussian_log_prob",
    "log_prob",
    "run_chain",
    "add_noise",
    "training_target",
    "is_flow_scheduler",
    "flow_sde_std",
]

Denoise = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""A denoiser closure ``(x_t, t) -> model_output`` (conditioning and guidance already bound)."""


class StepGrad(str, Enum):
    NONE = "none"
    PATHWISE = "pathwise"
    LIKELIHOOD = "likelihood"
    PERTURBED = "perturbed"


class DeterministicStepError(ChaintuneError):
    """Raised when a log-density is requested for a step with zero noise (eta = 0, or the last
    DDPM/DDIM step): the transition is a point mass and has no Gaussian log-probability."""


SUPPORTED = (DDPMScheduler, DDIMScheduler)
FLOW_SUPPORTED = (FlowMatchEulerDiscreteScheduler,)


def is_flow_scheduler(scheduler) -> bool:
    """Whether ``scheduler`` (an instance or a config dict) is a rectified-flow (SD3/Flux) scheduler."""
    if isinstance(scheduler, FLOW_SUPPORTED):
        return True
    if isinstance(scheduler, dict):
        return scheduler.get("_class_name") == FlowMatchEulerDiscreteScheduler.__name__
    return False


def make_scheduler(kind: str, config: dict) -> DDPMScheduler | DDIMScheduler:
    """Build a sampling scheduler of ``kind`` ('ddpm' or 'ddim') from any scheduler's config.

    ``kind='flow'`` builds a FlowMatchEulerDiscreteScheduler (its SDE form, see :func:`transition`).
    """
    if kind == "flow":
        return FlowMatchEulerDiscreteScheduler.from_config(config)
    kinds = {"ddpm": DDPMScheduler, "ddim": DDIMScheduler}
    if kind not in kinds:
        raise ChaintuneError(f"unknown scheduler {kind!r}; choose one of {sorted(kinds)}")
    return kinds[kind].from_config(config)


def as_chain_scheduler(scheduler) -> DDPMScheduler | DDIMScheduler:
    """The scheduler itself if the chain supports it, else a DDIM scheduler on its noise schedule.

    Pipelines ship PNDM, DPM-Solver or Euler schedulers for fast deterministic sampling; the chain
    needs stochastic Gaussian transitions, and DDIM (eta > 0) gives them on the same schedule.
    """
    if isinstance(scheduler, SUPPORTED):
        return scheduler
    if isinstance(scheduler, FLOW_SUPPORTED):
        return scheduler  # flow matching: the chain runs its SDE form (no DDIM equivalent)
    return DDIMScheduler.from_config(scheduler.config)


def prepare_scheduler(scheduler, num_steps: int, device=None):
    """Return a private copy of ``scheduler`` with ``num_steps`` inference timesteps set.

    The copy keeps the caller's scheduler untouched (schedulers are stateful in diffusers).
    """
    if isinstance(scheduler, FLOW_SUPPORTED):
        return _prepare_flow_scheduler(scheduler, num_steps, device)
    if not isinstance(scheduler, SUPPORTED):
        raise TypeError(
            f"{type(scheduler).__name__} is not supported by the chain; use DDPMScheduler or DDIMScheduler "
            "(chaintune.chain.make_scheduler('ddim', scheduler.config) converts most schedulers)"
        )
    if num_steps < 1 or num_steps > scheduler.config.num_train_timesteps:
        raise ChaintuneError(
            f"steps must be in [1, {scheduler.config.num_train_timesteps}], got {num_steps}"
        )
    s = copy.deepcopy(scheduler)
    s.set_timesteps(num_steps, device=device)
    return s


def _prepare_flow_scheduler(scheduler, num_steps: int, device=None):
    """Flow-matching copy with ``num_steps`` sigmas (plus the terminal 0).

    Dynamic shifting (Flux) needs the resolution-dependent ``mu`` the pipeline computes; a backend
    stores it as ``scheduler.chain_mu`` (without it we refuse rather than guess the schedule).
    """
    cfg = scheduler.config
    if num_steps < 1 or num_steps > cfg.num_train_timesteps:
        raise ChaintuneError(f"steps must be in [1, {cfg.num_train_timesteps}], got {num_steps}")
    if cfg.get("invert_sigmas", False) or cfg.get("stochastic_sampling", False):
        raise ChaintuneError("FlowMatchEulerDiscreteScheduler with invert_sigmas/stochastic_sampling is not supported")
    s = copy.deepcopy(scheduler)
    kw = {}
    if cfg.get("use_dynamic_shifting", False):
        mu = getattr(scheduler, "chain_mu", None)
        if mu is None:
            raise ChaintuneError("dynamic shifting needs `scheduler.chain_mu` (the pipeline's resolution-dependent mu)")
        kw["mu"] = mu
    s.set_timesteps(num_steps, device=device, **kw)
    return s


def _flow_index(scheduler, t) -> int:
    """Index of timestep ``t`` in a flow scheduler's (float) timesteps.

    The chain passes ``int(t)``, which truncates the float timestep tau: so we look for the tau
    in [t, t + 1), preferring an exact match.
    """
    ts = scheduler.timesteps.detach().to("cpu", torch.float64)
    tf = float(t)
    exact = (ts - tf).abs() < 1e-4
    if exact.any():
        return int(exact.nonzero()[0])
    hits = ((ts >= tf) & (ts < tf + 1)).nonzero().flatten()
    if len(hits) != 1:
        raise ValueError(f"timestep {tf} matches {len(hits)} of the flow scheduler's timesteps")
    return int(hits[0])


def flow_sde_std(sigma: float, sigma_next: float, eta: float, sigma_max: float) -> tuple[float, float]:
    """(g, std) of one flow SDE step: diffusion coefficient g = eta * sqrt(sigma / (1 - sigma)) and the
    Euler-Maruyama std g * sqrt(sigma - sigma_next). At sigma = 1 the coefficient is infinite, so
    (as Flow-GRPO does) sigma_max = the second sigma replaces it in the denominator."""
    denom = 1 - (sigma_max if sigma >= 1 else sigma)
    g = eta * math.sqrt(sigma / max(denom, 1e-12))
    return g, g * math.sqrt(max(sigma - sigma_next, 0.0))


def flow_sde_coefficient(scheduler, t, eta: float) -> float:
    """The diffusion coefficient g of the flow SDE step at chain timestep ``t`` (its std is g * sqrt(-ds)): what
    Flow-GRPO divides its KL by (``std_dev_t``)."""
    idx = _flow_index(scheduler, t)
    sigmas = scheduler.sigmas
    return flow_sde_std(float(sigmas[idx]), float(sigmas[idx + 1]), eta,
                        float(sigmas[1]) if len(sigmas) > 2 else 0.0)[0]


def _flow_transition(scheduler, model_output, t, sample, eta):
    """Rectified-flow SDE step, as in Flow-GRPO (Liu et al. 2025, `sde_step_with_logprob`).

    Noising is x_s = (1 - s) x_0 + s eps and the model predicts v = eps - x_0, so the score is
    -(x + (1 - s) v) / s. For any g(s) >= 0 the reverse SDE dx = [v - g^2/2 * score] ds + g dw has
    the probability-flow ODE's marginals; its Euler-Maruyama step from s to s' (ds = s' - s < 0) is

        mean = x + ds * v + g^2 ds / (2 s) * (x + (1 - s) v),   std = g * sqrt(-ds),

    with g = eta * sqrt(s / (1 - s)). eta = 0 is exactly FlowMatchEulerDiscreteScheduler.step
    (x + ds * v, same float ops). Every step is stochastic for eta > 0, the last one included
    (it lands at s' = 0 with std ~ eta * s_last), as in Flow-GRPO.
    """
    if eta < 0:
        raise ChaintuneError(f"eta must be >= 0, got {eta}")
    idx = _flow_index(scheduler, t)
    sigmas = scheduler.sigmas.to(sample.device)
    s, s_next = sigmas[idx], sigmas[idx + 1]
    ds = s_next - s
    g, std = flow_sde_std(float(s), float(s_next), eta, float(sigmas[1]) if len(sigmas) > 2 else 0.0)
    dt = sample.dtype
    v = model_output
    mean = sample + ds.to(dt) * v
    if g > 0:
        c = torch.as_tensor(g * g * float(ds) / (2 * float(s)), dtype=dt, device=sample.device)
        mean = mean + c * (sample + (1 - s.to(dt)) * v)
    x0 = sample - s.to(dt) * v
    return mean, torch.as_tensor(std, dtype=dt, device=sample.device), x0


def _prev_timestep(scheduler, t: int) -> int:
    if isinstance(scheduler, DDIMScheduler):
        return t - scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    return int(scheduler.previous_timestep(t))


def _alphas(scheduler, t: int, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    ac = scheduler.alphas_cumprod
    prev = _prev_timestep(scheduler, t)
    a_t = ac[t]
    if prev >= 0:
        a_prev = ac[prev]
    elif isinstance(scheduler, DDIMScheduler):
        a_prev = scheduler.final_alpha_cumprod
    else:
        a_prev = scheduler.one
    return a_t.to(device=device, dtype=torch.float64), torch.as_tensor(a_prev).to(device, torch.float64)


def _pred_x0_eps(scheduler, model_output, sample, a_t):
    cfg = scheduler.config
    a_t = a_t.to(sample.dtype)
    b_t = 1 - a_t
    if cfg.prediction_type == "epsilon":
        x0 = (sample - b_t**0.5 * model_output) / a_t**0.5
        eps = model_output
    elif cfg.prediction_type == "sample":
        x0 = model_output
        eps = (sample - a_t**0.5 * x0) / b_t**0.5
    elif cfg.prediction_type == "v_prediction":
        x0 = a_t**0.5 * sample - b_t**0.5 * model_output
        eps = a_t**0.5 * model_output + b_t**0.5 * sample
    else:
        raise ChaintuneError(f"unsupported prediction_type {cfg.prediction_type!r}")
    if cfg.thresholding:
        x0 = scheduler._threshold_sample(x0)
    elif cfg.clip_sample:
        x0 = x0.clamp(-cfg.clip_sample_range, cfg.clip_sample_range)
    return x0, eps


def transition(
    scheduler, model_output: torch.Tensor, t: int, sample: torch.Tensor, eta: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean, std and predicted x_0 of p(x_{t-1} | x_t) for one reverse step.

    ``std`` is a 0-d tensor (it does not depend on the parameters: only fixed-variance schedules
    are supported). For DDPMScheduler ``eta`` is ignored (DDPM is its own variance). Learned
    variances (``variance_type='learned*'``) are rejected: their log-prob would need the model's
    variance head, and the half-order/likelihood estimators assume a fixed std.
    """
    if model_output.shape[1] == 2 * sample.shape[1]:
        model_output = model_output[:, : sample.shape[1]]
    if isinstance(scheduler, FLOW_SUPPORTED):
        return _flow_transition(scheduler, model_output, t, sample, eta)
    a_t64, a_prev64 = _alphas(scheduler, int(t), sample.device, sample.dtype)
    x0, eps = _pred_x0_eps(scheduler, model_output, sample, a_t64)
    dt = sample.dtype
    if isinstance(scheduler, DDPMScheduler):
        vt = scheduler.config.variance_type
        if vt not in ("fixed_small", "fixed_large"):
            raise ChaintuneError(f"DDPM variance_type {vt!r} is not supported (use fixed_small or fixed_large)")
        cur_alpha = a_t64 / a_prev64
        cur_beta = 1 - cur_alpha
        b_t, b_prev = 1 - a_t64, 1 - a_prev64
        c0 = (a_prev64**0.5 * cur_beta / b_t).to(dt)
        ct = (cur_alpha**0.5 * b_prev / b_t).to(dt)
        mean = c0 * x0 + ct * sample
        if int(t) > 0:
            var = torch.clamp(b_prev / b_t * cur_beta, min=1e-20) if vt == "fixed_small" else cur_beta
            std = var.sqrt().to(dt)
        else:
            std = torch.zeros((), dtype=dt, device=sample.device)
    else:
        if eta < 0:
            raise ChaintuneError(f"eta must be >= 0, got {eta}")
        var = (1 - a_prev64) / (1 - a_t64) * (1 - a_t64 / a_prev64)
        std64 = eta * var.sqrt()
        std = std64.to(dt)
        mean = a_prev64.to(dt) ** 0.5 * x0 + (1 - a_prev64 - std64**2).clamp(min=0).to(dt) ** 0.5 * eps
    return mean, std, x0


def gaussian_log_prob(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Exact log N(x; mean, std^2 I), summed over all non-batch dimensions -> shape [n]."""
    if float(std) <= 0:
        raise DeterministicStepError("log-prob of a deterministic step (std = 0) is undefined")
    d = x[0].numel()
    sq = ((x - mean) ** 2).flatten(1).sum(1)
    return -sq / (2 * std**2) - d * torch.log(std) - 0.5 * d * math.log(2 * math.pi)


def log_prob(
    denoise: Denoise, scheduler, x_t: torch.Tensor, t: int, x_prev: torch.Tensor, eta: float = 1.0
) -> torch.Tensor:
    """Recompute log p_theta(x_prev | x_t) for a stored transition, with a graph to theta.

    ``scheduler`` must be one returned by :func:`prepare_scheduler` (timesteps set). Used by PPO
    (ratio of new to old policy) and by tests. Raises :class:`DeterministicStepError` where the
    step has no noise.
    """
    tt = torch.as_tensor(t, device=x_t.device)
    if isinstance(scheduler, FLOW_SUPPORTED):  # callers pass int(t); the model must see the float timestep
        tt = scheduler.timesteps[_flow_index(scheduler, t)].to(x_t.device)
    mean, std, _ = transition(scheduler, denoise(x_t, tt), int(t), x_t, eta)
    return gaussian_log_prob(x_prev, mean, std)


@dataclass
class Trajectory:
    """One run of the reverse chain for a batch of ``n`` samples.

    ``latents[i]`` is the input of chain position ``i`` (``latents[0] = x_T``,
    ``latents[-1] = x_0``); all stored tensors are detached. ``log_probs[:, i]`` is the exact
    Gaussian log p(x_{i+1} | x_i) evaluated at the taken sample, NaN where the step is
    deterministic (``stochastic[i]`` is False: eta = 0 or the final step). ``x0`` is the final
    latent *with* its graph when the last steps were pathwise. ``graph_log_probs[i]`` holds, for
    every LIKELIHOOD step ``i``, the log-prob with a graph to the parameters.
    """

    latents: list[torch.Tensor]
    timesteps: torch.Tensor
    means: list[torch.Tensor]
    stds: torch.Tensor
    noises: list[torch.Tensor]
    log_probs: torch.Tensor
    stochastic: torch.Tensor
    x0: torch.Tensor
    pred_x0: list[torch.Tensor] = field(default_factory=list)
    graph_log_probs: dict[int, torch.Tensor] = field(default_factory=dict)
    eta: float = 1.0
    images: torch.Tensor | None = None
    conditions: dict | None = None

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)

    def stacked_latents(self) -> torch.Tensor:
        """[n, steps + 1, ...] tensor of x_T ... x_0."""
        return torch.stack(self.latents, dim=1)


def _resolve_modes(modes, num_steps: int) -> list[StepGrad]:
    if modes is None:
        return [StepGrad.NONE] * num_steps
    if isinstance(modes, (str, StepGrad)):
        return [StepGrad(modes)] * num_steps
    if callable(modes):
        return [StepGrad(modes(i)) for i in range(num_steps)]
    out = [StepGrad(m) for m in modes]
    if len(out) != num_steps:
        raise ValueError(f"got {len(out)} step modes for {num_steps} steps")
    return out


def run_chain(
    denoise: Denoise,
    scheduler,
    x_T: torch.Tensor,
    *,
    num_steps: int,
    eta: float = 1.0,
    generator: torch.Generator | None = None,
    modes: Sequence[StepGrad | str] | Callable[[int], StepGrad | str] | StepGrad | str | None = None,
    perturb: Callable[[int], contextlib.AbstractContextManager] | None = None,
    noises: Sequence[torch.Tensor] | None = None,
    checkpoint: bool = False,
    stop_at: int | None = None,
    start: int = 0,
    on_log_prob: Callable[[int, torch.Tensor], None] | None = None,
) -> Trajectory:
    """Run the reverse chain from ``x_T`` and record the trajectory.

    Args:
        denoise: ``(x_t, t) -> model_output`` with conditioning/guidance bound.
        scheduler: a DDPMScheduler or DDIMScheduler (its timesteps are set on a private copy).
        modes: gradient mode per chain position (see :class:`StepGrad`), a callable of the
            position, or one mode for all steps.
        perturb: for PERTURBED steps, ``perturb(i)`` returns the context in which step ``i``
            runs (zeroth-order estimators perturb parameters there).
        noises: optional per-step noise tensors (replayed instead of drawn from ``generator``).
        checkpoint: recompute PATHWISE/LIKELIHOOD model calls in backward instead of storing
            their activations (memory of full backprop then grows only by one latent per step).
        stop_at: stop after chain position ``stop_at`` and return its predicted x_0 as ``x0``
            (ReFL-style "jump to the end" from an intermediate step).
        start: begin at chain position ``start`` (``x_T`` is then the latent entering that
            position): replays a stored sub-chain, e.g. one half-order span. ``modes`` and
            ``noises`` stay indexed by absolute position.
        on_log_prob: called as ``on_log_prob(i, log_prob)`` with each LIKELIHOOD step's log-prob (with its
            graph) instead of keeping it in ``graph_log_probs``: the caller backpropagates it at once, so the
            rollout holds one step's activations (DDPO's per-sample gradients while sampling).
    """
    sched = prepare_scheduler(scheduler, num_steps, device=x_T.device)
    step_modes = _resolve_modes(modes, num_steps)
    timesteps = sched.timesteps
    n = x_T.shape[0]
    x = x_T
    latents, means, noise_list, lps, pred_x0s = [x_T.detach()], [], [], [], []
    stds = torch.zeros(num_steps, dtype=torch.float32)
    stochastic = torch.zeros(num_steps, dtype=torch.bool)
    graph_lps: dict[int, torch.Tensor] = {}
    prev_mode = StepGrad.NONE
    last = num_steps - 1 if stop_at is None else stop_at
    if not 0 <= start <= last:
        raise ValueError(f"start={start} must lie in [0, {last}]")
    for i in range(start, last + 1):
        t = timesteps[i]
        mode = step_modes[i]
        if prev_mode != StepGrad.PATHWISE:
            x = x.detach()
        tracked = mode in (StepGrad.PATHWISE, StepGrad.LIKELIHOOD)
        if mode == StepGrad.PERTURBED:
            if perturb is None:
                raise ValueError("PERTURBED steps need a `perturb` context factory")
            ctx = perturb(i)
        else:
            ctx = contextlib.nullcontext()
        with ctx, torch.set_grad_enabled(tracked):
            if tracked and checkpoint:
                out = _checkpoint(denoise, x, t, use_reentrant=False)
            else:
                out = denoise(x, t)
            mean, std, x0_hat = transition(sched, out, int(t), x, eta)
        if noises is not None:
            z = noises[i].to(x)
        else:
            z = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        is_stoch = float(std) > 0
        stds[i] = std.detach().cpu()
        stochastic[i] = is_stoch
        if mode == StepGrad.PATHWISE:
            x_next = mean + std * z
        else:
            x_next = (mean + std * z).detach()
        if is_stoch:
            lp = gaussian_log_prob(x_next.detach(), mean.detach(), std)
            if mode == StepGrad.LIKELIHOOD:
                graph_lp = gaussian_log_prob(x_next.detach(), mean, std)
                if on_log_prob is None:
                    graph_lps[i] = graph_lp
                else:
                    on_log_prob(i, graph_lp)
        else:
            if mode == StepGrad.LIKELIHOOD:
                raise DeterministicStepError(
                    f"chain position {i} (t={int(t)}) has no noise (eta={eta}); a likelihood-ratio "
                    "gradient needs a stochastic step: use eta > 0 or another position"
                )
            lp = torch.full((n,), float("nan"), dtype=x.dtype, device=x.device)
        lps.append(lp)
        means.append(mean.detach())
        noise_list.append(z)
        pred_x0s.append(x0_hat.detach())
        if stop_at is not None and i == stop_at:
            x_next = x0_hat if mode == StepGrad.PATHWISE else x0_hat.detach()
        latents.append(x_next.detach())
        x = x_next
        prev_mode = mode
    return Trajectory(
        latents=latents,
        timesteps=timesteps[start: last + 1].detach().cpu(),
        means=means,
        stds=stds[start: last + 1],
        noises=noise_list,
        log_probs=torch.stack(lps, dim=1),
        stochastic=stochastic[start: last + 1],
        x0=x,
        pred_x0=pred_x0s,
        graph_log_probs=graph_lps,
        eta=eta,
    )


def add_noise(scheduler, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Forward process q(x_t | x_0), for training losses (pretraining, Diff-Tuning).

    Flow matching: x_t = (1 - s) x_0 + s * noise with s = t / num_train_timesteps (the transformer
    is conditioned on t = 1000 s; the schedule's shift only changes which s inference visits).
    """
    if is_flow_scheduler(scheduler):
        s = _flow_sigma(scheduler, t, x0)
        return (1 - s) * x0 + s * noise
    return scheduler.add_noise(x0, noise, t)


def training_target(scheduler, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """What the denoiser should output for the scheduler's prediction type."""
    if is_flow_scheduler(scheduler):
        return noise - x0  # the velocity d x_t / d s
    pt = scheduler.config.prediction_type
    if pt == "epsilon":
        return noise
    if pt == "sample":
        return x0
    if pt == "v_prediction":
        return scheduler.get_velocity(x0, noise, t)
    raise ChaintuneError(f"unsupported prediction_type {pt!r}")


def predict_x0(scheduler, model_output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The clean sample the denoiser's output implies at ``x_t`` (forward-process losses on x_0: DiffusionNFT).

    Flow matching: x_0 = x_t - s v (s = t / num_train_timesteps, the inverse of :func:`add_noise`). DDPM-style:
    the prediction type's x_0 at alpha_bar_t, without the sampler's clipping (a training loss needs its gradient
    everywhere)."""
    if is_flow_scheduler(scheduler):
        return x_t - _flow_sigma(scheduler, t, x_t) * model_output
    t = torch.as_tensor(t, device=scheduler.alphas_cumprod.device).long().reshape(-1)
    a_t = scheduler.alphas_cumprod[t].to(x_t.device, x_t.dtype).reshape(-1, *([1] * (x_t.dim() - 1)))
    pt = scheduler.config.prediction_type
    if pt == "epsilon":
        return (x_t - (1 - a_t) ** 0.5 * model_output) / a_t**0.5
    if pt == "sample":
        return model_output
    if pt == "v_prediction":
        return a_t**0.5 * x_t - (1 - a_t) ** 0.5 * model_output
    raise ChaintuneError(f"unsupported prediction_type {pt!r}")


def _flow_sigma(scheduler, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    s = torch.as_tensor(t, device=like.device).to(like.dtype) / scheduler.config.num_train_timesteps
    return s.reshape(-1, *([1] * (like.dim() - 1))) if s.dim() > 0 else s
