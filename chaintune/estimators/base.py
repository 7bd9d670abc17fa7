"""What every gradient estimator shares: the rollout context, rewards, baselines, perturbations.

An estimator maximises J(theta) = E[R(x_0)]. It never steps an optimizer: ``updates(ctx)`` is a
generator that runs the chain, *accumulates the estimate of -grad J into each trainable
parameter's ``.grad``* (so a minimising optimizer ascends J), and yields once per optimizer step
it wants (once for most estimators; once per inner epoch for PPO). Everything is averaged over
the ``n`` samples of the context, so gradient accumulation over micro-batches is a plain sum
scaled by the trainer.

Baselines never add bias: the baseline of sample k is built only from samples whose sampling
noise is independent of k's (leave-one-out), see :func:`advantages`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from chaintune.backends.base import Conditions, DiffusionModel
from chaintune.chain import StepGrad, Trajectory, run_chain
from chaintune.distributed import comm_device, is_sharded, local_shard, shard_group
from chaintune.errors import ChaintuneError
from chaintune.estimators.baselines import PerPromptStatTracker, group_keys, group_normalized
from chaintune.rewards import validate_reward_output
from chaintune.sampling import chain_scheduler


@dataclass
class EstimationContext:
    """Everything one estimate needs. ``conditions`` holds per-sample labels/prompts for ``n``."""

    model: DiffusionModel
    reward: Callable
    n: int
    steps: int = 50
    eta: float = 1.0
    scheduler: object = None
    generator: torch.Generator | None = None
    conditions: Conditions | None = None
    checkpoint: bool = True
    baseline: str = "prompt"  # one of BASELINES, see advantages()
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
    # A context under which ``model.denoise_fn`` runs the reference (base) policy, e.g.
    # ``lambda: base_model_weights(model, frozen_copy)``; estimators with a KL penalty to the reference need it.
    reference: Callable[[], contextlib.AbstractContextManager] | None = None
    # True when this micro-batch is one of several (micro-batches, processes) that form one step: an estimator that
    # forms its advantages over the step then yields :class:`Sampled` and reads ``step_advantages``, this micro-batch's
    # slice, which :func:`resolve_sampled` sets (DDPO's tracker, GRPO's groups and global std). Alone, it forms them
    # itself: the same numbers.
    step_shared: bool = False
    step_advantages: torch.Tensor | None = None
    # samples drawn per prompt/label in a row (align's --group-size); 1: one per prompt, which Flow-GRPO treats as
    # "no per-prompt statistics" (the batch z-score); None: not known (the groups are whatever prompts repeat)
    group_size: int | None = None

    def __post_init__(self):
        if self.scheduler is None:
            self.scheduler = chain_scheduler(self.model, "ddim")
        if self.conditions is None:
            self.conditions = self.model.default_conditions(self.n, generator=self.generator)
        if self.generator is None:
            self.generator = torch.Generator().manual_seed(0)

    @property
    def params(self) -> list[tuple[str, torch.nn.Parameter]]:
        return [(k, p) for k, p in self.model.denoiser.named_parameters() if p.requires_grad]


@dataclass
class Sampled:
    """Yielded first by an estimator whose advantages depend on the whole step's samples, not only this
    micro-batch's (:meth:`Estimator.needs_step_batch`): its rewards and group keys. The caller gathers every
    micro-batch's (and, with several processes, every process's), has :meth:`Estimator.step_advantages` form the
    advantages once, and sets each context's ``step_advantages`` before resuming (:func:`resolve_sampled`), as the
    references form them once per epoch batch (ddpo-pytorch's stat tracker, Flow-GRPO's groups and global std)."""

    rewards: torch.Tensor
    keys: list[str] | None  # None: no per-prompt statistics (the batch's)


@dataclass
class Stats:
    """What one estimate saw: rewards of the samples it drew, plus estimator-specific numbers."""

    rewards: torch.Tensor
    images: torch.Tensor | None = None
    extra: dict = field(default_factory=dict)

    @property
    def reward_mean(self) -> float:
        return float(self.rewards.float().mean())


class Estimator:
    """Base class. Subclasses say which chain positions get which gradient in :meth:`plan`.

    State that must survive checkpoint/resume (RLR's span norms, DDPO's per-prompt reward buffers)
    is exposed by :meth:`state_dict` / :meth:`load_state_dict` (JSON-friendly).
    """

    name = "estimator"
    needs_differentiable_reward = False
    # whether it has likelihood-ratio terms, whose variance a reward baseline lowers (``EstimationContext.baseline``);
    # align then draws prompts in groups so that a per-prompt baseline has samples to compare within
    uses_baseline = False
    # whether it compares the samples of one prompt (GRPO/NFT advantages, DPO pairs): align then draws prompts in
    # groups (the torch-free config reads the same fact from chaintune.estimators.options.GROUPED)
    compares_group = False
    # the EstimatorConfig fields its constructor takes: ``takes(name)``, from the options' own ``used_by``
    options: tuple[str, ...] = ()
    _tracker: PerPromptStatTracker | None = None

    def _init_tracker(self, tracker_buffer: int, tracker_min_count: int) -> None:
        self.tracker_buffer = tracker_buffer
        self.tracker_min_count = tracker_min_count
        self._tracker = PerPromptStatTracker(tracker_buffer, tracker_min_count)

    @property
    def needs_reference(self) -> bool:
        """Whether ``updates`` runs the reference (base) policy, ``ctx.reference`` (a KL to it, DPO's loss)."""
        return False

    def needs_step_batch(self, ctx: EstimationContext) -> bool:
        """Whether this estimator's advantages are formed over the whole step (then ``updates`` yields
        :class:`Sampled` first); the leave-one-out baselines are per micro-batch (unbiased either way)."""
        return False

    def step_advantages(self, rewards: torch.Tensor, keys: list[str] | None) -> torch.Tensor:
        """The advantages of a whole step's samples (every micro-batch and process), formed once; ``keys`` group
        them (None: no per-prompt statistics)."""
        raise NotImplementedError

    def advantages(self, rewards: torch.Tensor, cond: Conditions | None, kind: str,
                   normalize: bool = False) -> torch.Tensor:
        """:func:`advantages` with this estimator's per-prompt stat tracker (``kind='tracker'``)."""
        return advantages(rewards, cond, kind, normalize, tracker=self._tracker)

    def state_dict(self) -> dict:
        """What a checkpoint must keep: ``{"norms": {j: norm}, "stat_tracker": {...}}`` (entries only when set)."""
        out: dict = {}
        norms = getattr(self, "_norms", None)
        if norms:
            out["norms"] = {str(k): v for k, v in norms.items()}
        if self._tracker is not None and self._tracker.stats:
            out["stat_tracker"] = self._tracker.state_dict()
        return out

    def load_state_dict(self, state: dict) -> None:
        if state.get("norms") and hasattr(self, "_norms"):
            self._norms = {int(k): float(v) for k, v in state["norms"].items()}
        if state.get("stat_tracker") and self._tracker is not None:
            self._tracker.load_state_dict(state["stat_tracker"])

    def plan(self, num_steps: int, generator: torch.Generator | None = None) -> list[StepGrad]:
        raise NotImplementedError

    def updates(self, ctx: EstimationContext) -> Iterator[Stats]:
        raise NotImplementedError

    def check(self, ctx: EstimationContext) -> None:
        if self.needs_differentiable_reward and not getattr(ctx.reward, "differentiable", False):
            raise ChaintuneError(
                f"estimator {self.name!r} backpropagates through the reward, but reward "
                f"{getattr(ctx.reward, 'name', ctx.reward)!r} is not differentiable; use 'rlr', 'half-order', "
                "'reinforce' or 'zeroth-order'"
            )
        if not ctx.params:
            raise ChaintuneError("the model has no trainable parameters (requires_grad=False everywhere)")
        if self.needs_reference and ctx.reference is None:
            raise ChaintuneError(f"{self.name} needs the reference policy: the trainer must pass "
                                 "EstimationContext(reference=...) (a context that runs the base model)")

    def __repr__(self) -> str:
        fields_ = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({fields_})"


# ---------------------------------------------------------------------------------------------
# rollouts


def draw_noise(ctx: EstimationContext, n: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """x_T and per-step noise for ``n`` samples, drawn up front so a rollout can be replayed."""
    shape = (n, *ctx.model.latent_shape)
    dev, dt = ctx.model.device, ctx.model.dtype
    x_T = torch.randn(shape, generator=ctx.generator).to(dev, dt)
    noises = [torch.randn(shape, generator=ctx.generator).to(dev, dt) for _ in range(ctx.steps)]
    return x_T, noises


def rollout(
    ctx: EstimationContext,
    modes,
    *,
    x_T: torch.Tensor,
    noises: list[torch.Tensor],
    cond: Conditions,
    perturb=None,
    grad_reward: bool = False,
    stop_at: int | None = None,
    on_log_prob: Callable[[int, torch.Tensor], None] | None = None,
) -> tuple[Trajectory, torch.Tensor, torch.Tensor]:
    """Run the chain with ``modes``, decode, score. Returns (trajectory, images, rewards).

    ``on_log_prob``: see :func:`chaintune.chain.run_chain` (it backpropagates each step at once, so the steps
    are not checkpointed: that would run each forward pass twice)."""

    with ctx.autocast():
        denoise = ctx.model.denoise_fn(cond)
        traj = run_chain(denoise, ctx.scheduler, x_T, num_steps=ctx.steps, eta=ctx.eta, modes=modes,
                         perturb=perturb, noises=noises, checkpoint=ctx.checkpoint and on_log_prob is None,
                         stop_at=stop_at, on_log_prob=on_log_prob)
    with torch.set_grad_enabled(grad_reward):
        images = ctx.model.decode(traj.x0 if grad_reward else traj.x0.detach())
        r = ctx.reward(images, **cond.reward_kwargs())
    r = validate_reward_output(r, x_T.shape[0], getattr(ctx.reward, "name", "reward"))
    return traj, images, r


BASELINES = ("batch", "prompt", "none", "group", "tracker")


def advantages(rewards: torch.Tensor, cond: Conditions | None = None, kind: str = "batch",
               normalize: bool = False, tracker: PerPromptStatTracker | None = None) -> torch.Tensor:
    """R_k - b_k for the likelihood-ratio terms.

    Leave-one-out (unbiased: b_k is independent of sample k): ``'batch'`` uses the other samples of
    the batch; ``'prompt'`` the other samples of the same prompt/label (falling back to the batch when
    a prompt appears once, or when the model takes no conditions: then it *is* ``'batch'``); ``'none'``
    returns the rewards. ``'prompt'`` is the default: on a prompt model the reward's variance between
    prompts stays in every batch-baseline advantage and is removed by the per-prompt one
    (:func:`chaintune.diagnostics.variance_split`). ``normalize`` then divides by the batch
    std (DDPO's choice: rescales the step size, keeps the direction's expectation).

    Normalised, as the reference implementations (slightly biased: the sample is in its own
    statistics): ``'group'`` is GRPO's (r - mean_group) / (std_group + 1e-4) over the samples of the
    same prompt/label in this batch; ``'tracker'`` is DDPO's per-prompt stat tracker (running buffer,
    batch statistics below a minimum count), and needs the estimator's ``tracker``. Both are already
    normalised, so ``normalize`` does not apply to them.
    """
    r = rewards.detach().float()
    n = r.shape[0]
    if kind not in BASELINES:
        raise ChaintuneError(f"baseline must be one of {', '.join(BASELINES)}, got {kind!r}")
    if kind == "group":
        return group_normalized(r, group_keys(cond, n)).to(r.device)
    if kind == "tracker":
        if tracker is None:
            raise ChaintuneError("baseline 'tracker' needs a PerPromptStatTracker (the estimator's)")
        return tracker.update(group_keys(cond, n), r).to(r.device)
    if kind == "none" or n < 2:
        adv = r.clone()
    else:
        loo = (r.sum() - r) / (n - 1)
        adv = r - loo
        if kind == "prompt" and cond is not None:
            keys = cond.prompts if cond.prompts is not None else (
                cond.labels.tolist() if cond.labels is not None else None)
            if keys is not None:
                for key in set(keys):
                    idx = [i for i, k in enumerate(keys) if k == key]
                    if len(idx) > 1:
                        g = r[idx]
                        adv[idx] = g - (g.sum() - g) / (len(idx) - 1)
    if normalize and n > 1:
        adv = adv / (r.std() + 1e-8)
    return adv


# ---------------------------------------------------------------------------------------------
# zeroth-order parameter perturbations


class Perturbation:
    """Per-step Gaussian parameter perturbations theta + sign * sigma * u_i, regenerated from seeds.

    ``u_i`` is never stored: it is regenerated from ``(seed, i)`` when perturbing and again when
    forming the estimate, so memory stays flat in the number of steps. On exit the parameters
    are restored bit-exactly from a copy of the trainable subset.

    Sharded parameters (FSDP2 DTensors, :mod:`chaintune.distributed`): a forward all-gathers
    every process's shard, so all processes must perturb with the same ``u_i`` at the same steps. The
    seed is therefore taken from the first process; each process draws the full-shape ``u_i`` (the same
    numbers as unsharded) and perturbs only its shard. The estimate's scale is averaged over processes in
    :meth:`accumulate`, because a process holds only its shard of every process's ``-scale * u_i``.
    """

    def __init__(self, params: list[torch.nn.Parameter], sigma: float, seed: int, shared: bool = False):
        self.params = params
        self.sigma = sigma
        self.seed = seed
        self.shared = shared
        self._group = shard_group(params)
        if self._group is not None:
            seed_t = torch.tensor([seed], dtype=torch.long, device=comm_device(self._group))
            torch.distributed.broadcast(seed_t, group=self._group, group_src=0)
            self.seed = int(seed_t)

    def direction(self, i: int) -> list[torch.Tensor]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + (0 if self.shared else i + 1))
        return [local_shard(torch.randn(p.shape, generator=g), p) for p in self.params]

    @contextlib.contextmanager
    def apply(self, i: int, sign: float):
        saved = [p.detach().clone() for p in self.params]
        with torch.no_grad():
            for p, u in zip(self.params, self.direction(i), strict=True):
                p.add_(u, alpha=sign * self.sigma)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, s in zip(self.params, saved, strict=True):
                    p.copy_(s)

    def accumulate(self, steps: list[int], scale: float) -> None:
        """Add ``-scale * u_i`` for each perturbed step to ``.grad`` (minimisation convention).

        Sharded parameters get the mean over processes of ``scale`` (their ``u_i`` are shared), so that
        ``.grad`` holds the process average, as FSDP leaves the backpropagated part; unsharded parameters
        get this process's ``scale`` (the trainer averages them).
        """
        mean_scale = scale
        if self._group is not None:
            seen: list = [None] * torch.distributed.get_world_size(self._group)
            torch.distributed.all_gather_object(seen, (list(steps), float(scale)), group=self._group)
            if any(s != list(steps) for s, _ in seen):
                raise ChaintuneError(
                    "sharded zeroth-order estimate: processes perturbed different chain steps "
                    f"({[s for s, _ in seen]}); under FSDP every process must draw the same plan")
            mean_scale = sum(c for _, c in seen) / len(seen)
        for i in steps:
            with torch.no_grad():
                for p, u in zip(self.params, self.direction(i), strict=True):
                    if p.grad is None:
                        p.grad = torch.zeros_like(p)
                    p.grad.add_(u, alpha=-(mean_scale if is_sharded(p) else scale))


def mirrored_zeroth_order(
    ctx: EstimationContext,
    modes: list[StepGrad],
    sigma: float,
    seed: int,
    shared: bool = False,
    grad_reward: bool = False,
    surrogate: Callable[[Trajectory, torch.Tensor, torch.Tensor, Conditions], torch.Tensor] | None = None,
) -> Stats:
    """Run two mirrored half-batches (+sigma*u, -sigma*u) that share x_T and all step noise.

    The zeroth-order estimate for each PERTURBED position i is (mean R+ - mean R-) / (2 sigma) * u_i:
    the paper's (R - b) u / sigma with the mirrored run as baseline (common random numbers make
    the reward difference reflect the perturbation, not the sampling noise). Other positions are
    handled by ``surrogate(traj, images, rewards, cond)``, backpropagated per half so that only
    one half's graph is alive at a time.
    """
    if ctx.n % 2:
        raise ChaintuneError(f"zeroth-order estimators pair samples: n must be even, got {ctx.n}")
    half = ctx.n // 2
    params = [p for _, p in ctx.params]
    pert = Perturbation(params, sigma, seed, shared=shared)
    x_T, noises = draw_noise(ctx, half)
    cond = ctx.conditions.subset(range(half))
    zo_steps = [i for i, m in enumerate(modes) if m == StepGrad.PERTURBED]
    means, all_r, all_img = [], [], []
    for sign in (1.0, -1.0):
        traj, images, r = rollout(ctx, modes, x_T=x_T, noises=noises, cond=cond,
                                  perturb=lambda i, s=sign: pert.apply(i, s), grad_reward=grad_reward)
        if surrogate is not None:
            loss = surrogate(traj, images, r, cond)
            if loss.requires_grad:
                loss.backward()
        means.append(r.detach().float().mean())
        all_r.append(r.detach())
        all_img.append(images.detach())
    diff = float(means[0] - means[1])
    pert.accumulate(zo_steps, diff / (2 * sigma))
    return Stats(rewards=torch.cat(all_r), images=torch.cat(all_img),
                 extra={"zo_steps": len(zo_steps), "zo_reward_diff": diff})


def resolve_sampled(estimator: Estimator, contexts: list[EstimationContext], iters: list,
                    gather: Callable[[list], list] | None = None) -> None:
    """Run every micro-batch's estimator up to its :class:`Sampled` (when the estimator needs the step's batch; the
    contexts are marked ``step_shared`` here, before the generators start),
    form the step's advantages once over all of them (and, with ``gather``, over every process: it returns the
    list of each process's ``(rewards, keys)``, this one's at ``rank``), and give each context its slice."""
    if not contexts or not estimator.needs_step_batch(contexts[0]):
        return
    for ctx in contexts:
        ctx.step_shared = True
    sampled = [next(it) for it in iters]
    if not all(isinstance(s, Sampled) for s in sampled):
        raise TypeError(f"estimator {estimator.name!r} needs the step's batch but did not yield Sampled first")
    keyed = all(s.keys is not None for s in sampled)
    mine = (torch.cat([s.rewards.detach().float().cpu() for s in sampled]),
            [k for s in sampled for k in s.keys] if keyed else None)
    parts, rank = gather(mine) if gather is not None else ([mine], 0)
    keys = [k for p in parts for k in p[1]] if all(p[1] is not None for p in parts) else None
    adv = estimator.step_advantages(torch.cat([p[0] for p in parts]), keys)
    start = sum(len(p[0]) for p in parts[:rank])
    for ctx, s in zip(contexts, sampled, strict=True):
        ctx.step_advantages = adv[start: start + len(s.rewards)]
        start += len(s.rewards)
