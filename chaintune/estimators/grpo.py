"""GRPO for diffusion / flow models, following Flow-GRPO (Liu et al. 2025, yifan123/flow_grpo).

* advantages normalised within each group of samples of the same prompt/label in the batch,
  A = (r - mean_group) / (std_group + 1e-4), clipped to +-``adv_clip`` (Flow-GRPO: 5);
* the clipped PPO ratio on the per-dimension mean log-prob of every stochastic transition
  (clip 1e-4), as :class:`~chaintune.estimators.reinforce.Reinforce`;
* a KL penalty to the reference (base) policy, per step and in closed form: both transitions are
  Gaussians with the same std, so

      KL(p_theta(.|x_i) || p_ref(.|x_i)) = |mean_theta - mean_ref|^2 / (2 std_i^2)   (summed over dims),

  added with weight ``kl_coef`` (Flow-GRPO's ``beta``) at every trained position.

Units: as everywhere in chaintune the policy term is backpropagated as D x DDPO's per-dimension loss
(an unbiased -grad E[R] on the first epoch) and the KL is the summed one, i.e. D x Flow-GRPO's
per-dimension KL; the ratio of the two terms, hence ``kl_coef`` = ``beta``, is Flow-GRPO's. One
difference, on purpose: Flow-GRPO divides the squared mean difference by 2 g^2 with g its SDE's
diffusion coefficient (``std_dev_t``), not by the step's variance g^2 |d sigma|, so its "KL" is the KL
times |d sigma|; here it is the exact per-step KL (the same formula for DDPM/DDIM and flow steps), and
``kl_form="flow-grpo"`` gives Flow-GRPO's (flow models).

The reference policy comes from the context: ``ctx.reference()`` is a context manager under which
``ctx.model.denoise_fn`` runs the base model (LoRA adapters disabled, or a frozen copy swapped in;
see ``chaintune.align.base_model_weights``). It is required when ``kl_coef > 0``.
Works for DDPM-style chains (DDIM eta > 0; the deterministic last step is skipped, as DDPO does)
and for flow models (every SDE step is stochastic, the last one included, as in Flow-GRPO).
The context's ``baseline`` is not read: GRPO's baseline is the group normalisation.
"""

from __future__ import annotations

import torch

from chaintune.chain import flow_sde_coefficient, is_flow_scheduler, transition
from chaintune.errors import ChaintuneError
from chaintune.estimators.base import EstimationContext
from chaintune.estimators.baselines import grpo_advantages, step_group_keys
from chaintune.estimators.options import DEFAULTS as D
from chaintune.estimators.options import takes
from chaintune.estimators.reinforce import Reinforce


class GRPO(Reinforce):
    name = "grpo"

    compares_group = True
    options = takes("grpo")

    def __init__(self, inner_epochs: int = D.inner_epochs, clip_range: float = D.clip_range,
                 kl_coef: float = D.kl_coef, global_std: bool = D.global_std, kl_form: str = D.kl_form,
                 step_fraction: float = 1.0, adv_clip: float = 5.0, reuse_rollout: str = D.reuse_rollout):
        if kl_coef < 0:
            raise ChaintuneError(f"kl_coef must be >= 0, got {kl_coef}")
        if kl_form not in ("exact", "flow-grpo"):
            raise ChaintuneError(f"kl_form must be exact or flow-grpo, got {kl_form!r}")
        super().__init__(inner_epochs=inner_epochs, clip_range=clip_range, normalize_advantages=False,
                         step_fraction=step_fraction, final_step="skip", adv_clip=adv_clip,
                         reuse_rollout=reuse_rollout)
        self.kl_coef = kl_coef
        self.global_std = global_std
        self.kl_form = kl_form

    def baseline(self, ctx: EstimationContext) -> str:
        return "group"

    def needs_step_batch(self, ctx: EstimationContext) -> bool:
        """Flow-GRPO groups and normalises the gathered epoch batch: a prompt drawn on two processes is one group,
        and the global std is the whole batch's."""
        return True

    def step_advantages(self, rewards: torch.Tensor, keys: list[str] | None) -> torch.Tensor:
        return grpo_advantages(rewards, keys, self.global_std, self.adv_clip)

    def _step_keys(self, ctx: EstimationContext) -> list[str] | None:
        return step_group_keys(ctx)

    @property
    def needs_reference(self) -> bool:
        return self.kl_coef > 0

    def check(self, ctx: EstimationContext) -> None:
        super().check(ctx)
        if self.kl_coef > 0 and self.kl_form == "flow-grpo" and not is_flow_scheduler(ctx.scheduler):
            raise ChaintuneError("kl_form flow-grpo is Flow-GRPO's KL of flow SDE steps; this model's chain is "
                                 "DDPM-style (use kl_form exact)")

    def _penalty(self, ctx, denoise, sched, traj, i, mean, std):
        if self.kl_coef <= 0:
            return None
        x_i, t = traj.latents[i], traj.timesteps[i]
        with torch.no_grad(), ctx.reference():
            ref_mean, _, _ = transition(sched, ctx.model.denoise_fn(ctx.conditions)(x_i, t.to(x_i.device)), int(t),
                                        x_i, ctx.eta)
        # Flow-GRPO divides by its SDE coefficient g^2 (std_dev_t), not by the step's variance std^2 = g^2 |d sigma|
        var = flow_sde_coefficient(sched, t, ctx.eta) ** 2 if self.kl_form == "flow-grpo" else std.float() ** 2
        kl = ((mean.float() - ref_mean.float()) ** 2).flatten(1).sum(1) / (2 * var)
        return self.kl_coef * kl.mean()

    def _penalty_metrics(self, penalty_sum: float, m: int) -> dict:
        return {"kl": penalty_sum / m / self.kl_coef} if self.kl_coef > 0 else {}
