"""RLR, the Recursive Likelihood Ratio optimizer (Ren et al., paper eq. 6).

Which positions get which gradient (paper's step t = chain position T - t):

* step 1 (the final position):  first-order, pathwise dR/dx_0 through that one step;
* a span of h steps ending at paper step j (positions T-j-h+1 .. T-j): half-order, i.e.
  pathwise inside the span and a likelihood ratio on the span's last noise;
* every other step: zeroth-order parameter perturbation (its own u_t per step).

Every position is covered by exactly one unbiased estimator for every draw of j, so the sum is
unbiased for any distribution of j (Thm 6.3); memory is that of h + 1 steps, flat in T.
``j``: ``"uniform"`` (j ~ U{2, ..., T-h+1}), ``"grad-norm"`` (softmax over running estimates of
each span's gradient norm, divided by their mean so the choice is scale-free — paper Sec. 4),
or ``(a, b)`` (the span stays inside paper steps [a, b]: "diffusive chain of thought").
With a black-box reward the final step is covered zeroth-order instead of first-order.

``spans=m`` (default 1, the paper's single span) averages m estimates whose spans are drawn
independently, G = (1/m) sum_i G_i, all on one rollout: each distinct span is replayed from the stored
latents and noise (memory stays that of h steps) and its half-order term weighted by its draw count / m.
Each G_i is unbiased, so the average is too, for any distribution of j; it only lowers the variance of
the half-order term (with ``zo=False`` its expectation is exactly that of the single-span estimator).
With ``zo=True``, positions inside some span run unperturbed (a likelihood ratio needs the transition it
differentiates); in a G_i where such a position lies outside span i it is covered by a one-step
likelihood ratio (the h = 1 half-order term, also unbiased) instead of zeroth-order. With ``ho=False``
there is no span to average and ``spans`` has no effect.

``zo=False`` / ``ho=False`` give the paper's ablations (those steps are then left out or moved to
zeroth-order). :class:`RLRReleased` is the authors' released variant: first-order on the final
step (at eta = 0 there if asked) plus ``chain_len`` likelihood-ratio steps at uniformly random
positions, nothing else (biased); at its defaults it is this estimator with h = 1, no ZO.
"""

from __future__ import annotations

from collections import Counter

import torch

from chaintune.chain import StepGrad, run_chain
from chaintune.distributed import shared_plan
from chaintune.errors import ChaintuneError
from chaintune.estimators.base import (
    EstimationContext,
    Estimator,
    Stats,
    draw_noise,
    mirrored_zeroth_order,
    rollout,
)
from chaintune.estimators.half_order import replay_span_log_prob
from chaintune.estimators.options import DEFAULTS as D
from chaintune.estimators.options import takes
from chaintune.estimators.ppo import ppo_objective
from chaintune.rewards import validate_reward_output


class RLR(Estimator):
    name = "rlr"
    uses_baseline = True
    options = takes("rlr")

    def __init__(self, h: int = D.h, j: str | tuple[int, int] = D.j, sigma: float = D.sigma, zo: bool = D.zo,
                 ho: bool = D.ho, shared_perturbation: bool = D.shared_perturbation, norm_decay: float = 0.9,
                 spans: int = D.spans, fo: bool = D.fo, tracker_buffer: int = D.tracker_buffer,
                 tracker_min_count: int = D.tracker_min_count):
        if h < 1:
            raise ChaintuneError(f"h must be >= 1, got {h}")
        if spans < 1:
            raise ChaintuneError(f"spans must be >= 1, got {spans}")
        if isinstance(j, str) and "," in j:  # "a,b" as written on the command line
            try:
                j = tuple(int(v) for v in j.split(","))
            except ValueError:
                raise ChaintuneError(f"j must be 'uniform', 'grad-norm' or 'a,b' (paper steps), got {j!r}") from None
        if isinstance(j, (list, tuple)):
            j = tuple(j)
        if not (j in ("uniform", "grad-norm") or (isinstance(j, tuple) and len(j) == 2 and j[0] <= j[1])):
            raise ChaintuneError(f"j must be 'uniform', 'grad-norm' or (a, b) with a <= b, got {j!r}")
        self.h = h
        self.j = j
        self.sigma = sigma
        self.zo = zo
        self.ho = ho
        self.fo = fo
        self.shared_perturbation = shared_perturbation
        self.norm_decay = norm_decay
        self.spans = spans
        self._norms: dict[int, float] = {}
        self._init_tracker(tracker_buffer, tracker_min_count)

    # which steps get which gradient -----------------------------------------------------------
    def j_range(self, num_steps: int) -> tuple[int, int]:
        """Allowed paper-steps j for the span (the span is j .. j+h-1, never step 1)."""
        lo, hi = 2, num_steps - self.h + 1
        if isinstance(self.j, tuple):
            a, b = self.j
            lo, hi = max(lo, a), min(hi, b - self.h + 1)
        if hi < lo:
            raise ChaintuneError(
                f"no room for a half-order span of h={self.h} in {num_steps} steps"
                + (f" within j range {self.j}" if isinstance(self.j, tuple) else "")
                + f": need h <= {num_steps - 1}" + (" and b - a >= h" if isinstance(self.j, tuple) else "")
            )
        return lo, hi

    def sample_j(self, num_steps: int, generator=None) -> int:
        lo, hi = self.j_range(num_steps)
        choices = list(range(lo, hi + 1))
        if self.j == "grad-norm" and self._norms:
            known = [self._norms.get(c) for c in choices]
            mean = sum(v for v in known if v is not None) / max(1, sum(v is not None for v in known))
            logits = torch.tensor([(v if v is not None else mean) / (mean + 1e-12) for v in known])
            idx = int(torch.multinomial(torch.softmax(logits, 0), 1, generator=generator))
            return choices[idx]
        return choices[int(torch.randint(0, len(choices), (1,), generator=generator))]

    def plan(self, num_steps, generator=None, j: int | None = None, differentiable: bool = True) -> list[StepGrad]:
        if num_steps < 2:
            raise ChaintuneError("RLR needs at least 2 steps")
        j = self.sample_j(num_steps, generator) if j is None else j
        rest = StepGrad.PERTURBED if self.zo else StepGrad.NONE
        modes = [rest] * num_steps
        end = num_steps - j  # position of paper step j
        if self.ho:
            for i in range(end - self.h + 1, end):
                modes[i] = StepGrad.PATHWISE
            modes[end] = StepGrad.LIKELIHOOD
        else:
            for i in range(end - self.h + 1, end + 1):
                modes[i] = StepGrad.PERTURBED
        modes[-1] = self._final_mode(differentiable)
        return modes

    def _final_mode(self, differentiable: bool) -> StepGrad:
        """Step 1: first-order (zeroth-order for a black-box reward); nothing with ``fo=False`` (an ablation that
        isolates the other terms, e.g. to measure each term's signal-to-noise ratio)."""
        if not self.fo:
            return StepGrad.NONE
        return StepGrad.PATHWISE if differentiable else StepGrad.PERTURBED

    # the estimate ---------------------------------------------------------------------------------
    def updates(self, ctx: EstimationContext):
        if self.spans > 1 and self.ho:
            yield from self._averaged_updates(ctx)
            return
        self.check(ctx)
        differentiable = bool(getattr(ctx.reward, "differentiable", False)) and self.fo
        params = [p for _, p in ctx.params]
        j = shared_plan([self.sample_j(ctx.steps, ctx.generator)], params)[0]  # sharded: the first process's
        modes = self.plan(ctx.steps, j=j, differentiable=bool(getattr(ctx.reward, "differentiable", False)))
        lr_pos = [i for i, m in enumerate(modes) if m == StepGrad.LIKELIHOOD]
        ho_norm: list[float] = []

        def surrogate(traj, images, r, cond):
            loss = torch.zeros((), device=r.device)
            if differentiable:
                loss = loss - r.sum() / ctx.n
            if lr_pos:
                adv = self.advantages(r, cond, ctx.baseline).to(r.device)
                ho = -(adv * traj.graph_log_probs[lr_pos[0]]).sum() / ctx.n
                if self.j == "grad-norm":
                    ho_norm.append(_accumulate_measuring_norm(ho, params))
                else:
                    loss = loss + ho
            return loss

        stats = self._run(ctx, modes, differentiable, surrogate)
        if ho_norm:
            self._track_norm(j, ho_norm)
        stats.extra.update({"j": j, "h": self.h})
        yield stats

    def _run(self, ctx: EstimationContext, modes: list[StepGrad], differentiable: bool, surrogate) -> Stats:
        """One rollout under ``modes`` (mirrored pair when a step is perturbed); backpropagates ``surrogate``."""
        if StepGrad.PERTURBED in modes:
            seed = int(torch.randint(0, 2**31 - 1, (1,), generator=ctx.generator))
            return mirrored_zeroth_order(ctx, modes, self.sigma, seed, shared=self.shared_perturbation,
                                         grad_reward=differentiable, surrogate=surrogate)
        x_T, noises = draw_noise(ctx, ctx.n)
        traj, images, r = rollout(ctx, modes, x_T=x_T, noises=noises, cond=ctx.conditions,
                                  grad_reward=differentiable)
        loss = surrogate(traj, images, r, ctx.conditions)
        if loss.requires_grad:  # grad-norm mode may already have accumulated every term
            loss.backward()
        return Stats(rewards=r.detach(), images=images.detach())

    def _terms_in_rollout(self, ctx: EstimationContext) -> bool:
        """Whether the averaged estimate takes its likelihood-ratio terms from the rollout's own graph. With h = 1
        every term is one step's log-prob at its own position, which the rollout tracks (LIKELIHOOD): the replay's
        value and graph without the replay's forward pass. Only under checkpointing, where a tracked step holds its
        inputs only; without it the m tracked steps would hold their activations at once (measured: 2.2 -> 3.7 GB
        on benchmarks/peers.py's tiny SD), and RLR's memory stays one span's. grad-norm needs each term's own
        backward, and h > 1 spans overlap in ways one rollout's graph cannot hold: those replay each span."""
        return ctx.checkpoint and self.h == 1 and self.j != "grad-norm"

    def _track_norm(self, j: int, values: list[float]) -> None:
        """Running mean of span j's gradient norm (the ``j="grad-norm"`` sampling weights)."""
        prev, val = self._norms.get(j), sum(values) / len(values)
        self._norms[j] = val if prev is None else self.norm_decay * prev + (1 - self.norm_decay) * val

    def _averaged_updates(self, ctx: EstimationContext):
        """``spans`` > 1: the average of ``spans`` eq. 6 estimates with independently drawn j, on one rollout."""

        self.check(ctx)
        differentiable = bool(getattr(ctx.reward, "differentiable", False))
        T, m = ctx.steps, self.spans
        js = shared_plan([self.sample_j(T, ctx.generator) for _ in range(m)], [p for _, p in ctx.params])
        counts = Counter(js)
        spans = {j: (T - j - self.h + 1, T - j) for j in counts}  # chain positions s..e of paper steps j..j+h-1
        covered: Counter[int] = Counter()  # how many of the m draws cover each chain position
        for j, (s, e) in spans.items():
            covered.update({i: counts[j] for i in range(s, e + 1)})
        in_rollout = self._terms_in_rollout(ctx)
        modes = [StepGrad.PERTURBED if self.zo else StepGrad.NONE] * T
        for i in covered:
            modes[i] = StepGrad.LIKELIHOOD if in_rollout else StepGrad.NONE
        modes[-1] = self._final_mode(differentiable)
        differentiable = differentiable and self.fo  # from here: whether the reward's gradient is taken
        # likelihood-ratio terms: (weight, span). With ZO on, a covered position outside span i gets a
        # one-step likelihood ratio in G_i (it ran unperturbed), weight (m - covered) / m.
        terms = [(counts[j] / m, spans[j], j) for j in sorted(counts)]
        if self.zo:
            terms += [((m - c) / m, (i, i), None) for i, c in sorted(covered.items()) if c < m]
        params = [p for _, p in ctx.params]
        ho_norm: dict[int, list[float]] = {}

        def surrogate(traj, images, r, cond):
            adv = self.advantages(r, cond, ctx.baseline).to(r.device)
            loss = -r.sum() / ctx.n if differentiable else torch.zeros((), device=r.device)
            for w, span, j in terms:
                if in_rollout:
                    loss = loss - w * (adv * traj.graph_log_probs[span[1]]).sum() / ctx.n
                    continue
                term = -(adv * replay_span_log_prob(ctx, traj.latents, traj.noises, span, cond)).sum() / ctx.n
                if self.j == "grad-norm" and j is not None:
                    ho_norm.setdefault(j, []).append(_accumulate_measuring_norm(term, params, weight=w))
                else:
                    (w * term).backward()
            return loss

        stats = self._run(ctx, modes, differentiable, surrogate)
        for j, vals in ho_norm.items():
            self._track_norm(j, vals)
        stats.extra.update({"j": js[0], "h": self.h, "spans": m, "distinct_spans": len(counts)})
        yield stats


def _accumulate_measuring_norm(term: torch.Tensor, params: list, weight: float = 1.0) -> float:
    """Add ``weight`` * d term / d params into ``.grad`` and return the norm of the unweighted gradient
    (``j="grad-norm"`` needs each span's own norm, so that term cannot share one backward pass)."""
    grads = torch.autograd.grad(term, params, allow_unused=True)
    for p, g in zip(params, grads, strict=True):
        if g is not None:
            p.grad = weight * g if p.grad is None else p.grad + weight * g
    return float(torch.sqrt(sum((g.float() ** 2).sum() for g in grads if g is not None)))


class RLRReleased(RLR):
    """The authors' released code path (RTkenny/RLR-Opimtizer, ``rlr_trainer_v_b.py``, strategy "RLR").

    Per estimate: one rollout; a first-order term on the final step, ``fo_coef * -mean R(x_0)``
    (pathwise through that step only), plus ``chain_len`` likelihood-ratio steps at positions drawn
    independently and uniformly (with replacement; their terms are summed, as the release sums its
    ``HO_loss``), each weighted by ``lr_coef``. The release's options:

    * ``final_eta``: the eta of the final, first-order step (the release: 0, a deterministic last step;
      ``None``: the chain's eta). The rest of the chain keeps the chain's eta.
    * ``chain_len``: number of likelihood-ratio steps (the release's script: 2).
    * ``lr_clip_range``: > 0 puts each likelihood-ratio step in the release's PPO form,
      max(-A rho, -A clip(rho, 1 +- eps)) with rho = exp(clamp(lp_mean - lp_mean_old, +-20)) on the
      per-dimension mean log-prob (the release: 1e-4); 0 keeps eq. 6's plain term A * grad log p.
      The release computes rho on the rollout it has just sampled with the same weights, so rho = 1
      and the clip never binds: the gradient equals the plain term's (to rounding). It is kept for
      fidelity (the release's loss form), not because it changes the estimate.
    * ``fo_coef`` / ``lr_coef``: the release's ``loss_coeff`` / ``ho_loss_coeff``. Here ``lr_coef``
      multiplies chaintune's unbiased likelihood-ratio term (summed log-prob, see
      :mod:`chaintune.estimators.ppo`); the release's ``ho_loss_coeff`` c weights a per-dimension loss
      with batch z-scored advantages, which is ``lr_coef`` = c / (D * std R) here (D = latent size).

    Draws never land on the final position (it is covered first-order; in the release a draw there
    meets a deterministic step whose NaN log-prob zeroes the whole likelihood-ratio loss).
    The advantage is the context's baseline (the release z-scores rewards over the batch).

    At its defaults (chain_len 1, final_eta None, lr_clip_range 0, coefficients 1) this is exactly
    ``rlr`` with h = 1, spans = 1, zo = False: the same draws of j, the same rollout, the same gradient
    bit for bit (tests/test_ppo_grpo.py). It is biased: steps other than the drawn ones get no gradient.
    """

    name = "rlr-released"
    needs_differentiable_reward = True
    options = takes("rlr-released")

    def __init__(self, chain_len: int = D.chain_len, final_eta: float | None = D.final_eta,
                 lr_clip_range: float = D.lr_clip_range, fo_coef: float = D.fo_coef, lr_coef: float = D.lr_coef,
                 tracker_buffer: int = D.tracker_buffer, tracker_min_count: int = D.tracker_min_count):
        if chain_len < 0:
            raise ChaintuneError(f"chain_len must be >= 0, got {chain_len}")
        if final_eta is not None and final_eta < 0:
            raise ChaintuneError(f"final_eta must be >= 0, got {final_eta}")
        if lr_clip_range < 0:
            raise ChaintuneError(f"lr_clip_range must be >= 0, got {lr_clip_range}")
        super().__init__(h=1, zo=False, spans=1, tracker_buffer=tracker_buffer, tracker_min_count=tracker_min_count)
        self.chain_len = chain_len
        self.final_eta = final_eta
        self.lr_clip_range = lr_clip_range
        self.fo_coef = fo_coef
        self.lr_coef = lr_coef

    def plan(self, num_steps, generator=None, j: int | list[int] | None = None, differentiable=True):
        if num_steps < 2:
            raise ChaintuneError("rlr-released needs at least 2 steps")
        if j is None:
            js = [self.sample_j(num_steps, generator) for _ in range(self.chain_len)]
        else:
            js = [j] if isinstance(j, int) else list(j)
        modes = [StepGrad.NONE] * num_steps
        for jj in js:
            modes[num_steps - jj] = StepGrad.LIKELIHOOD
        modes[-1] = StepGrad.PATHWISE
        return modes

    def updates(self, ctx: EstimationContext):
        self.check(ctx)
        T = ctx.steps
        js = shared_plan([self.sample_j(T, ctx.generator) for _ in range(self.chain_len)], [p for _, p in ctx.params])
        counts = Counter(T - j for j in js)  # chain position -> number of draws
        modes = self.plan(T, j=js)
        separate = self.final_eta is not None and self.final_eta != ctx.eta
        if separate:
            modes[-1] = StepGrad.NONE  # rerun below at final_eta, pathwise
        x_T, noises = draw_noise(ctx, ctx.n)
        if separate:
            traj, images, r = self._rollout_final_eta(ctx, modes, x_T, noises)
        else:
            traj, images, r = rollout(ctx, modes, x_T=x_T, noises=noises, cond=ctx.conditions, grad_reward=True)
        fo = r.sum() / ctx.n
        loss = torch.zeros((), device=r.device) - (fo if self.fo_coef == 1 else self.fo_coef * fo)
        if counts:
            adv = self.advantages(r, ctx.conditions, ctx.baseline).to(r.device)
        dim = traj.latents[0][0].numel()
        clipped = 0.0
        for pos, c in sorted(counts.items()):
            lp = traj.graph_log_probs[pos]
            if self.lr_clip_range > 0:
                per_sample, ratio = ppo_objective(adv, lp / dim, traj.log_probs[:, pos] / dim, self.lr_clip_range,
                                                  max_log_ratio=20.0)
                term = dim * per_sample.mean()
                clipped += c * float(((ratio - 1).abs() > self.lr_clip_range).float().mean())
            else:
                term = -(adv * lp).sum() / ctx.n
            w = c * self.lr_coef
            loss = loss + (term if w == 1 else w * term)
        loss.backward()
        extra = {"j": js[0] if js else 0, "h": 1, "chain_len": self.chain_len}
        if self.lr_clip_range > 0 and js:
            extra["clip_frac"] = clipped / len(js)
        yield Stats(rewards=r.detach(), images=images.detach(), extra=extra)

    def _rollout_final_eta(self, ctx: EstimationContext, modes, x_T, noises):
        """The chain at the context's eta up to the final step, then that step at ``final_eta``, pathwise."""

        T = ctx.steps
        with ctx.autocast():
            denoise = ctx.model.denoise_fn(ctx.conditions)
            traj = run_chain(denoise, ctx.scheduler, x_T, num_steps=T, eta=ctx.eta, modes=modes, noises=noises,
                             checkpoint=ctx.checkpoint)
            last = run_chain(denoise, ctx.scheduler, traj.latents[-2], num_steps=T, eta=self.final_eta,
                             modes=[StepGrad.NONE] * (T - 1) + [StepGrad.PATHWISE], noises=noises,
                             checkpoint=ctx.checkpoint, start=T - 1)
        images = ctx.model.decode(last.x0)
        cond = ctx.conditions
        r = ctx.reward(images, **cond.reward_kwargs())
        r = validate_reward_output(r, x_T.shape[0], getattr(ctx.reward, "name", "reward"))
        return traj, images, r
