"""Reward alignment: ``align(AlignConfig)``, an objective over the shared run skeleton.

Each optimizer step: every micro-batch runs the chosen estimator (which accumulates -grad J into
``.grad``); the guards add their gradients (KL to the base model's transitions, a retention loss
on base-model samples); the skeleton (:mod:`chaintune.run.trainer`) averages over
micro-batches and processes, checks, clips and applies. Evaluation on held-out seeds scores the
samples with what the reward family declares (:mod:`chaintune.rewards.evaluation`): the reward,
its held-out twin, diversity and the family's realism measures.
"""

from __future__ import annotations

import contextlib
import copy
import json
from collections.abc import Iterator
from pathlib import Path

import torch

import chaintune
from chaintune.align.config import AlignConfig, ChainConfig
from chaintune.align.controls import ControlPool
from chaintune.align.guard import HackingGuard, guard_policy
from chaintune.backends.base import Conditions, DiffusionModel
from chaintune.backends.controlled import load_controlled
from chaintune.chain import add_noise, prepare_scheduler, run_chain, training_target, transition
from chaintune.errors import ChaintuneError
from chaintune.estimators.base import EstimationContext, resolve_sampled
from chaintune.estimators.registry import estimator_from_config
from chaintune.prompts import StagedModel, StagePrompts, load_prompts
from chaintune.rewards import validate_reward_output
from chaintune.rewards.evaluation import reward_evaluation
from chaintune.run.pilot import parse_lrs, pilot_steps, run_pilot
from chaintune.run.rundir import check_run_dir
from chaintune.run.trainer import Evaluation, Objective, Trainer
from chaintune.sampling import chain_scheduler, initial_noise, make_conditions, sample

__all__ = ["AlignConfig", "align", "estimator_from_config", "kl_to_base", "retention_loss", "read_metrics"]


def _gather_objects(mine) -> tuple[list, int]:
    """Every process's ``mine`` (in rank order) and this process's rank."""
    parts: list = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(parts, mine)
    return parts, torch.distributed.get_rank()


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@contextlib.contextmanager
def base_model_weights(model, frozen_copy):
    """Run the base (pre-alignment) model: LoRA adapters disabled, or a frozen copy's weights."""
    if frozen_copy is not None:
        live = model.denoiser
        model.denoiser = frozen_copy
        try:
            yield
        finally:
            model.denoiser = live
        return
    from peft.tuners.lora import LoraLayer

    layers = [m for m in model.denoiser.modules() if isinstance(m, LoraLayer)]
    for m in layers:
        m.enable_adapters(False)
    try:
        yield
    finally:
        for m in layers:
            m.enable_adapters(True)


def kl_to_base(model, frozen_copy, chain: ChainConfig, sched, gen: torch.Generator, cond: Conditions,
               n: int = 4) -> torch.Tensor:
    """Closed-form KL(p_theta(x_{i+1}|x_i) || p_base(x_{i+1}|x_i)) = |m - m_base|^2 / 2 std^2 at a random
    stochastic position i of a fresh rollout, times the number of steps (an unbiased estimate of the
    path KL's per-step sum)."""

    n = cond.labels.shape[0] if cond.labels is not None else (len(cond.prompts) if cond.prompts else n)
    i = int(torch.randint(0, chain.sample_steps - 1, (1,), generator=gen))
    x_T = initial_noise(model, n, gen)
    with torch.no_grad():
        tr = run_chain(model.denoise_fn(cond), sched, x_T, num_steps=chain.sample_steps, eta=chain.eta, generator=gen,
                       stop_at=i)

    s = prepare_scheduler(sched, chain.sample_steps, device=x_T.device)
    x_i, t = tr.latents[i], tr.timesteps[i]
    mean, std, _ = transition(s, model.denoise_fn(cond)(x_i, t.to(x_i.device)), int(t), x_i, chain.eta)
    with torch.no_grad(), base_model_weights(model, frozen_copy):
        base_mean, _, _ = transition(s, model.denoise_fn(cond)(x_i, t.to(x_i.device)), int(t), x_i, chain.eta)
    if float(std) <= 0:
        return torch.zeros((), device=x_i.device)
    kl = ((mean - base_mean) ** 2).flatten(1).sum(1) / (2 * std**2)
    return kl.mean() * (chain.sample_steps - 1)


def retention_loss(model, bank: torch.Tensor, gen: torch.Generator, n: int) -> torch.Tensor:
    """Denoising loss on samples of the base model (keeps what the model knew; cf. Diff-Tuning)."""

    idx = torch.randint(0, len(bank), (n,), generator=gen)
    x0 = bank[idx].to(model.device, model.dtype)
    noise = torch.randn(x0.shape, generator=gen).to(x0)
    t = torch.randint(0, model.scheduler.config.num_train_timesteps, (n,), generator=gen).to(x0.device)
    xt = add_noise(model.scheduler, x0, noise, t)
    pred = model.model_output(xt, t, model.default_conditions(n) if not model.conditional else Conditions())
    return torch.nn.functional.mse_loss(pred.float(), training_target(model.scheduler, x0, noise, t).float())


class AlignObjective(Objective):
    """Maximise E[R(x_0)] through the chain with the configured estimator (+ guards)."""

    command = "align"
    evaluate_at_start = True
    progress_key = "reward_mean"
    # the chain's log-probs must be the sampling policy's: no dropout, no label drop (DiT's embedding drops 10% of
    # class labels in train mode, which made the first PPO epoch's ratio differ from 1 on DiT)
    train_mode = False

    def __init__(self, cfg: AlignConfig):
        self.cfg = cfg
        self.guard = HackingGuard(cfg.guards.realism_tolerance, cfg.guards.collapse_ratio)
        self.alarm_policy = guard_policy(cfg.guards)
        self.pilot: dict | None = None  # what `--pilot` probed and chose, for the status file and report

    def fsdp_refusal(self) -> str | None:
        if self.cfg.guards.kl_weight > 0:
            return ("the KL guard draws its chain position on each process, and sharded processes must run the "
                    "same forwards; use --kl-weight 0 (the hacking guard still runs)")
        if self.cfg.estimator.name == "rlr" and self.cfg.estimator.j == "grad-norm":
            return ("--j grad-norm measures each span's gradient with torch.autograd.grad, which does not reach "
                    "sharded parameters; use --j uniform or a,b")
        return None

    def prepare(self, run: Trainer) -> None:
        cfg, chain = self.cfg, self.cfg.chain
        heldout = None if cfg.eval.heldout_reward == "" else cfg.eval.heldout_reward
        self.evaluation = reward_evaluation(cfg.reward, heldout)  # every name resolved before anything is written
        self.reward = self.evaluation.reward
        self.estimator = estimator_from_config(cfg)
        if cfg.estimator.name == "rlr" and not getattr(self.reward, "differentiable", False):
            # docs/results.md, "Ranking at 4,800 samples": on digit-blackbox:5, 150 x 32, 3 seeds
            run.log_line(f"note: {self.reward.name!r} is black-box, so RLR's first-order last step becomes a "
                         "zeroth-order one; on the black-box digit target DDPO (--estimator reinforce) learned "
                         "3x more (27.6% vs 9.4% held-out share), and DiffusionNFT (--estimator nft), which never "
                         "uses the reward's gradient, reached 97.9% on the same classifier's digit:5")
        self.controls = None
        if chain.controlnet is not None:  # the ControlNet trains (model.denoiser), its base stays frozen
            model = load_controlled(chain.controlnet, base=chain.model, device=str(run.device))
            self.controls = ControlPool.load(model, chain.controlnet, chain.control_data)
        else:
            model = chaintune.load(chain.model, device=str(run.device), vae_chunk=chain.vae_chunk,
                                   video_shape=chain.video_shape)
        run.threads_for(model)  # the retention bank below samples under the rule
        self.prompts = self._prompts(model)
        pool = self.prompts is not None or chain.labels is not None  # conditions drawn from a pool can repeat
        self.group_size = cfg.group_size_for(uses_baseline=pool and self.estimator.uses_baseline)
        self.frozen = None
        needs_reference = cfg.guards.kl_weight > 0 or self.estimator.needs_reference
        if needs_reference and cfg.optim.peft == "none":  # LoRA needs no copy: the base is the adapters switched off
            self.frozen = copy.deepcopy(model.denoiser).requires_grad_(False).eval()
        self.sched = chain_scheduler(model, chain.scheduler)
        stages = self._stage_prompts()
        if stages is not None:  # every denoiser closure (training, KL, eval) then switches prompts by chain position

            model = StagedModel(model, stages, steps=chain.sample_steps, scheduler=self.sched)
        self.model = model
        self._probe_reward()  # labels/prompts the model cannot take, a reward of the wrong shape or dtype: now
        self.bank = None
        if cfg.guards.retention_weight > 0:
            self.bank = sample(model, cfg.guards.retention_samples, steps=chain.sample_steps, eta=chain.eta,
                               generator=torch.Generator().manual_seed(cfg.run.seed + 99), scheduler=self.sched,
                               decode=False, progress="retention samples" if run.bars else None).x0

    def _probe_reward(self) -> None:
        """Score two decoded random latents before anything is written, so a reward that raises or returns the
        wrong shape, dtype or NaN fails the command, not the run's first step."""

        c = self._conditions(2, torch.Generator().manual_seed(0))

        with torch.no_grad():
            images = self.model.decode(initial_noise(self.model, 2, torch.Generator().manual_seed(0)))
            validate_reward_output(self.reward(images, **c.reward_kwargs()), 2, self.reward.name)

    def _prompts(self, model: DiffusionModel) -> list[str] | None:
        """Prompts from --prompt-file (.txt one a line with # comments, .json list, or builtin:NAME) or --prompt;
        without either, the prompts a prompt model ships (``default_prompts``), if any."""
        chain = self.cfg.chain
        source = chain.prompt_file
        if source is None and chain.prompts is None and model.takes_prompts:
            source = model.default_prompts
        if source:
            try:
                return load_prompts(source).prompts
            except (FileNotFoundError, ValueError) as e:
                raise ChaintuneError(str(e)) from e
        return chain.prompts

    def _stage_prompts(self):
        chain = self.cfg.chain
        if chain.coarse_prompt is None and chain.mid_prompt is None and chain.fine_prompt is None:
            return None

        b1, b2 = (float(v) for v in chain.stage_boundaries.split(","))
        return StagePrompts(coarse=chain.coarse_prompt, mid=chain.mid_prompt, fine=chain.fine_prompt,
                            boundaries=(b1, b2))

    def _conditions(self, n: int, gen: torch.Generator, group: int = 1, heldout: bool = False) -> Conditions:
        """``n`` conditions: prompts/labels drawn at random, each repeated ``group`` times in a row (GRPO groups);
        a ControlNet's samples also get control images (drawn alike; ``heldout``: the evaluation's) and, without
        labels or prompts, the null condition, so that the control alone steers them."""

        labels, prompts = self.cfg.chain.labels, self.prompts
        if self.controls is not None:
            if labels is None and prompts is None:
                cond = self.model.null_conditions(n)
                if self.cfg.chain.guidance_scale is not None:
                    cond.guidance_scale = self.cfg.chain.guidance_scale
            else:
                cond = self._drawn_conditions(n, gen, group)
            pool = self.controls
            cond.control = (pool.heldout_controls(n) if heldout else pool.draw(n, gen, group)).to(
                self.model.device, self.model.dtype)
            return cond
        return self._drawn_conditions(n, gen, group)

    def _drawn_conditions(self, n: int, gen: torch.Generator, group: int) -> Conditions:
        labels, prompts = self.cfg.chain.labels, self.prompts

        def draw(pool):
            picks = torch.randint(0, len(pool), (-(-n // group),), generator=gen).repeat_interleave(group)
            return [pool[int(i)] for i in picks[:n]]

        p = None if prompts is None else draw(prompts)
        lab = None if labels is None else draw(labels)
        try:
            return make_conditions(self.model, n, labels=lab, prompts=p, guidance_scale=self.cfg.chain.guidance_scale,
                                   generator=gen)
        except ValueError as e:
            raise ChaintuneError(str(e)) from e

    def _reference(self):
        """A context in which the model runs its base (pre-alignment) weights (grpo's KL reference)."""
        return base_model_weights(self.model, self.frozen)

    def updates(self, run: Trainer, step: int) -> Iterator[tuple[int, dict]]:
        cfg, chain, guards, gen = self.cfg, self.cfg.chain, self.cfg.guards, run.generator
        ctxs = [EstimationContext(model=self.model, reward=self.reward, n=cfg.optim.batch_size,
                                  steps=chain.sample_steps, eta=chain.eta, scheduler=self.sched, generator=gen,
                                  conditions=self._conditions(cfg.optim.batch_size, gen, self.group_size),
                                  checkpoint=cfg.optim.gradient_checkpointing, baseline=cfg.estimator.baseline,
                                  autocast=run.autocast, reference=self._reference, group_size=self.group_size)
                for _ in range(cfg.optim.grad_accum)]
        iters = [self.estimator.updates(c) for c in ctxs]
        # advantages formed over the whole step (DDPO's tracker, GRPO's groups): every micro-batch and process first
        resolve_sampled(self.estimator, ctxs, iters, _gather_objects if run.acc.num_processes > 1 else None)
        rewards: list[torch.Tensor] = []
        while True:  # one optimizer update per round in which any micro-batch yields (PPO: per inner epoch)
            got = [s for s in (next(it, None) for it in iters) if s is not None]
            if not got:
                break
            rewards += [s.rewards.float().cpu() for s in got]
            metrics = {k: v for s in got for k, v in s.extra.items() if isinstance(v, (int, float))}
            if guards.kl_weight > 0:
                with run.autocast():
                    kl = kl_to_base(self.model, self.frozen, chain, self.sched, gen,
                                    self._conditions(guards.kl_samples, gen), n=guards.kl_samples)
                (guards.kl_weight * kl * len(got)).backward()
                metrics["kl"] = float(kl.detach())
            if self.bank is not None:
                with run.autocast():
                    ret = retention_loss(self.model, self.bank, gen, cfg.optim.batch_size)
                (guards.retention_weight * ret * len(got)).backward()
                metrics["retention_loss"] = float(ret.detach())
            r = torch.cat(rewards)  # every sample of this step so far, over all processes
            if run.acc.num_processes > 1:
                r = run.acc.gather(r.to(run.acc.device)).cpu()
            metrics.update(reward_mean=float(r.mean()), reward_std=float(r.std()) if len(r) > 1 else 0.0)
            yield len(got), metrics

    def evaluate(self, run: Trainer, step: int) -> Evaluation:
        cfg, chain = self.cfg, self.cfg.chain
        n = cfg.eval.eval_samples
        eval_gen = torch.Generator().manual_seed(10_000 + cfg.run.seed)  # held-out seeds: never used in training
        c = self._conditions(n, eval_gen, heldout=True)
        with run.autocast():
            tr = sample(self.model, n, steps=chain.sample_steps, eta=chain.eta, generator=eval_gen, labels=c.labels,
                        prompts=c.prompts, guidance_scale=c.guidance_scale, scheduler=self.sched,
                        progress=f"evaluation (step {step})" if run.bars else None,
                        conditions=c if self.controls is not None else None)
        metrics = self.evaluation(tr.images, **c.reward_kwargs())
        if self.controls is not None:
            metrics.update(self.controls.metrics(tr.images))
        metrics["eval/base_distance"] = self.guard.base_distance(tr.images)
        return Evaluation(metrics, tr.images[:64], score=metrics.get("eval/heldout_reward", metrics["eval/reward"]),
                          alarm=self.guard.alarm(metrics), captions=None if c.prompts is None else c.prompts[:64])

    def state_dict(self) -> dict:
        return {"estimator": self.estimator.state_dict(), "guard": self.guard.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if state.get("estimator"):
            self.estimator.load_state_dict(state["estimator"])
        elif state.get("estimator_norms"):  # checkpoints written before the estimators kept their own state
            self.estimator.load_state_dict({"norms": state["estimator_norms"]})
        if state.get("guard"):
            self.guard.load_state_dict(state["guard"])

    def info(self) -> dict:
        # the model actually trained (one passed in Python may not be the configured id): what load() needs for adapter/
        info = {"base_model": self.model.source or self.cfg.chain.model, "heldout_reward": self.evaluation.heldout_spec}
        if self.pilot is not None:
            info["pilot"] = self.pilot
        if self.controls is not None:  # what `chaintune sample --controlnet` and a further align run read back
            info.update(controlnet=self.cfg.chain.controlnet, condition=self.controls.kind,
                        control_data=self.controls.data)
        return info


def align(cfg: AlignConfig, *, overwrite: bool = False, resume: bool = False, show_progress: bool | None = None,
          thread_policy: bool = True) -> Path:
    """Run reward alignment; returns the run directory (a model id for ``chaintune.load``).

    ``thread_policy=False`` leaves torch's CPU thread count alone (see :class:`~chaintune.run.trainer.Trainer`)."""
    return align_run(cfg, overwrite=overwrite, resume=resume, show_progress=show_progress,
                     thread_policy=thread_policy).out


def _heldout_score(metrics: dict) -> float:
    return float(metrics.get("eval/heldout_reward", metrics.get("eval/reward", float("nan"))))


def align_pilot(cfg: AlignConfig, *, thread_policy: bool = True, log=print) -> tuple[AlignConfig, dict]:
    """``--pilot``'s probes over --pilot-estimators x --pilot-lrs (:mod:`chaintune.run.pilot`): each the run's
    config for the pilot's steps, evaluated half-way and at the end, the hacking guard warning (never rolling back);
    returns the full run's config (pilot off, so a resumed run does not probe again) and the pilot's record."""
    steps = pilot_steps(cfg.optim.steps, cfg.pilot.pilot_steps)
    grid = [{"estimator": e, "lr": lr} for e in cfg.pilot.estimators(cfg.estimator.name)
            for lr in parse_lrs(cfg.pilot.pilot_lrs)]

    def apply(c: AlignConfig, point: dict) -> None:
        c.estimator.name, c.optim.lr, c.pilot.pilot = point["estimator"], point["lr"], False

    def fit(c: AlignConfig) -> tuple[float, float, list[str]]:
        c.optim.steps, c.eval.eval_every, c.eval.final_model = steps, max(1, steps // 2), "last"
        c.guards.on_hacking = "warn"  # a probe is judged by its alarms, not rolled back
        c.run.tensorboard = c.run.report = False
        objective = AlignObjective(c)
        trainer = Trainer(c, objective, out=None, show_progress=False, thread_policy=thread_policy)
        res = trainer.fit()
        alarms = [e["reason"] for e in trainer.state.get(objective.alarm_policy.name, [])]
        return _heldout_score(res.final), _heldout_score(res.first_eval), alarms

    return run_pilot(cfg, grid, apply, steps, fit, score_name="held-out reward", log=log)


def align_run(cfg: AlignConfig, *, overwrite: bool = False, resume: bool = False, show_progress: bool | None = None,
              thread_policy: bool = True):
    """Like :func:`align`, returning the :class:`~chaintune.run.trainer.RunResult` (history, final metrics).

    With ``cfg.pilot.pilot`` (and not resuming) the pilot's probes run first (:func:`align_pilot`); the run
    then trains with the chosen estimator and LR, and its status file and report record the probes."""
    pilot = None
    if cfg.pilot.pilot and not resume:
        cfg.validate()
        check_run_dir(cfg.run.out, overwrite=overwrite, resume=resume)  # a refused --out fails before the probes
        cfg, pilot = align_pilot(cfg, thread_policy=thread_policy)
    objective = AlignObjective(cfg)
    objective.pilot = pilot
    return Trainer(cfg, objective, out=cfg.run.out, overwrite=overwrite, resume=resume,
                   show_progress=show_progress, thread_policy=thread_policy).fit()
