"""Online Diffusion-DPO: preference pairs ranked by the reward among samples of one prompt, Diffusion-DPO's loss
against the frozen base model (Wallace et al. 2023, arXiv 2311.12908; online as Flow-Factory's ``DPOTrainer``).

A no-grad rollout gives clean samples x_0 and their rewards. Within each group of samples of one prompt (label;
on a model without conditions: each run of ``group_size`` consecutive samples) the best sample is the winner w and
the worst the loser l: one pair per group, as the reference forms them. At a training time t both are noised with
the *same* eps, and with e(model, x) = |model(x_t) - target(x, eps, t)|^2 (the mean over dimensions of the
denoising loss: eps for DDPM-style models, the velocity eps - x_0 for flow models; :func:`chaintune.chain.
training_target`) the loss is

    -log sigmoid( -beta / 2 * ( [e(theta, w) - e(ref, w)] - [e(theta, l) - e(ref, l)] ) ),

the mean over pairs and training times; ``dpo_beta`` 2000 is Diffusion-DPO's SD-1.5 value and Flow-Factory's
default. The reference is the base policy: ``ctx.reference()`` (LoRA switched off, or the frozen copy). Each
training time is backpropagated on its own (memory of one denoiser call on 2 x pairs). Logged: the loss and the
implicit accuracy (the share of pairs whose inside term is positive: the model already prefers the winner more
than the reference does).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from chaintune.chain import StepGrad, add_noise, prepare_scheduler, training_target
from chaintune.errors import ChaintuneError
from chaintune.estimators.base import EstimationContext, Estimator, Stats, draw_noise, rollout
from chaintune.estimators.baselines import group_keys
from chaintune.estimators.nft import training_times
from chaintune.estimators.options import DEFAULTS as D
from chaintune.estimators.options import takes


def dpo_loss(err_w: torch.Tensor, err_l: torch.Tensor, ref_w: torch.Tensor, ref_l: torch.Tensor,
             beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pair Diffusion-DPO loss and its inside term (module docstring), from per-pair mean squared errors."""
    inside = -0.5 * beta * ((err_w - ref_w) - (err_l - ref_l))
    return -F.logsigmoid(inside), inside


def preference_pairs(rewards: torch.Tensor, keys: list[str], group_size: int) -> tuple[list[int], list[int]]:
    """(winners, losers): the best and the worst sample of each group with at least two samples and unequal
    rewards. Groups are the keys (prompts, labels); where all keys are equal (no conditions), runs of
    ``group_size`` consecutive samples."""
    if len(set(keys)) == 1 and group_size > 1:
        keys = [str(i // group_size) for i in range(len(keys))]
    winners, losers = [], []
    r = rewards.detach().float().cpu()
    for key in dict.fromkeys(keys):
        idx = [i for i, k in enumerate(keys) if k == key]
        if len(idx) < 2:
            continue
        g = r[idx]
        best, worst = idx[int(g.argmax())], idx[int(g.argmin())]
        if g[idx.index(best)] > g[idx.index(worst)]:
            winners.append(best)
            losers.append(worst)
    return winners, losers


class OnlineDPO(Estimator):
    name = "dpo"
    compares_group = True
    options = takes("dpo")

    def __init__(self, dpo_beta: float = D.dpo_beta, train_timesteps: int = D.train_timesteps):
        if dpo_beta <= 0 or train_timesteps < 0:
            raise ChaintuneError(f"dpo needs dpo_beta > 0 and train_timesteps >= 0, got {dpo_beta}, {train_timesteps}")
        self.dpo_beta = dpo_beta
        self.train_timesteps = train_timesteps

    @property
    def needs_reference(self) -> bool:
        return True

    def plan(self, num_steps, generator=None):
        return [StepGrad.NONE] * num_steps  # the rollout carries no gradient; training is on the forward process

    def updates(self, ctx: EstimationContext):
        self.check(ctx)
        x_T, noises = draw_noise(ctx, ctx.n)
        with torch.no_grad():
            traj, images, rewards = rollout(ctx, StepGrad.NONE, x_T=x_T, noises=noises, cond=ctx.conditions)
        win, lose = preference_pairs(rewards, group_keys(ctx.conditions, ctx.n), ctx.group_size or 1)
        extra = {"dpo_pairs": len(win)}
        if not win:  # every group a single sample or a tie: nothing to prefer (a zero gradient, said in the log)
            yield Stats(rewards=rewards, images=images, extra={**extra, "dpo_loss": float("nan")})
            return
        x0 = traj.x0.detach()
        both = torch.tensor(win + lose, device=x0.device)
        x0_pairs, p = x0[both], len(win)
        cond = ctx.conditions.subset(both.tolist())  # the winners', then the losers' conditions
        sched = prepare_scheduler(ctx.scheduler, ctx.steps, device=x0.device)
        times = training_times(traj.timesteps, self.train_timesteps, ctx.generator)
        denoise = ctx.model.denoise_fn(cond)
        dims = tuple(range(1, x0.dim()))
        total = accuracy = 0.0
        for t in times:
            eps = torch.randn((p, *x0.shape[1:]), generator=ctx.generator).to(x0).repeat(2, *[1] * (x0.dim() - 1))
            tb = t.expand(2 * p)
            x_t = add_noise(sched, x0_pairs, eps, tb)
            target = training_target(sched, x0_pairs, eps, tb)
            with ctx.autocast():
                err = ((denoise(x_t, t.to(x_t.device)).float() - target.float()) ** 2).mean(dims)
                with torch.no_grad(), ctx.reference():
                    ref = ((ctx.model.denoise_fn(cond)(x_t, t.to(x_t.device)).float() - target.float()) ** 2).mean(dims)
                loss, inside = dpo_loss(err[:p], err[p:], ref[:p], ref[p:], self.dpo_beta)
            (loss.mean() / len(times)).backward()
            total += float(loss.detach().mean())
            accuracy += float((inside.detach() > 0).float().mean())
        yield Stats(rewards=rewards, images=images, extra={**extra, "dpo_loss": total / len(times),
                                                            "dpo_accuracy": accuracy / len(times)})

