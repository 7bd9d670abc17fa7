"""Reward alignment trainer: ``AlignConfig`` + ``align(config)``, one loop you can read top to bottom.

Each optimizer step: every micro-batch runs the chosen estimator (which accumulates -grad J into
``.grad``), optional guards add their gradients (KL to the base model's transitions, a retention
loss on base-model samples), gradients are averaged over micro-batches and processes, clipped,
checked for NaN/inf, and applied. Evaluation on held-out seeds logs the reward, a held-out
reward from a network training never saw, sample diversity, and a sample grid.

Multi-process: the model is *not* wrapped in DDP (zeroth-order estimators write gradients that
DDP's hooks would not see); instead gradients are all-reduced explicitly after accumulation, so
every estimator is exact under ``accelerate launch``. Each process draws its own samples.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from chaintune.backends.base import Conditions
from chaintune.errors import ChaintuneError

# our names -> diffusers.optimization.get_scheduler's (all with linear warm-up over warmup_steps)
LR_SCHEDULES = {"constant": "constant_with_warmup", "cosine": "cosine", "linear": "linear"}


@dataclass
class AlignConfig:
    """Every option of ``chaintune align`` (CLI flags and config-file keys share these names)."""

    model: str = "builtin:digits"
    reward: str = "digit:3"
    estimator: str = "rlr"
    # estimator options
    h: int = 1
    j: str = "uniform"  # uniform | grad-norm | "a,b"
    sigma: float = 1e-3
    # rlr: zeroth-order on the remaining steps. Off by default: with >= 1e4 trainable parameters the ZO terms
    # multiply the estimate's variance by ~d*T and stall training (README, "RLR in practice"); the
    # authors' released code omits them too. --zo gives the paper's full, unbiased eq. 6.
    zo: bool = False
    ho: bool = True  # rlr: half-order span (False = paper's "without HO" ablation)
    spans: int = 1  # rlr: independent half-order spans averaged per sample (unbiased; less variance, more compute)
    shared_perturbation: bool = False  # rlr / zeroth-order: one direction u for all ZO steps
    k: int = 1
    inner_epochs: int = 1
    clip_range: float = 1e-4
    # chain
    sample_steps: int = 20
    eta: float = 1.0
    scheduler: str = "ddim"
    guidance_scale: float | None = None
    prompts: list[str] | None = None
    prompt_file: str | None = None
    labels: list[int] | None = None
    # optimisation
    steps: int = 100
    batch_size: int = 32
    grad_accum: int = 1
    lr: float = 3e-4
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    warmup_steps: int = 0
    lr_schedule: str = "constant"  # constant | cosine | linear (after warm-up; decays to 0 at the last step)
    peft: str = "none"  # none | lora
    lora_rank: int = 4
    mixed_precision: str = "no"  # no | fp16 | bf16
    gradient_checkpointing: bool = True
    vae_chunk: int | None = None  # decode latents this many samples at a time (peak memory of reward backprop)
    eight_bit_adam: bool = False  # bitsandbytes AdamW8bit when usable (CUDA), else AdamW with a warning
    # diffusive chain of thought: per-stage prompts (None = the sample's own prompt)
    coarse_prompt: str | None = None
    mid_prompt: str | None = None
    fine_prompt: str | None = None
    stage_boundaries: str = "0.3333,0.6667"  # chain-position fractions b1,b2
    baseline: str = "batch"
    # reward-hacking guards
    kl_weight: float = 0.0
    kl_samples: int = 4
    retention_weight: float = 0.0
    retention_samples: int = 64
    heldout_reward: str | None = "auto"
    # evaluation, logging, checkpoints
    eval_every: int = 25
    eval_samples: int = 64
    save_every: int = 50
    keep_checkpoints: int = 2
    max_bad_steps: int = 5
    seed: int = 0
    out: str = "runs/align"
    device: str | None = None
    tensorboard: bool = True
    progress: bool = True
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, values: dict) -> AlignConfig:
        from chaintune.utils.io import strict_config

        return strict_config(cls, values, "align option")

    def validate(self) -> None:
        if self.steps < 1 or self.batch_size < 1 or self.grad_accum < 1:
            raise ChaintuneError("steps, batch_size and grad_accum must be >= 1")
        if self.sample_steps < 2:
            raise ChaintuneError("sample_steps must be >= 2")
        if self.estimator in ("rlr", "half-order") and self.h >= self.sample_steps:
            raise ChaintuneError(f"h={self.h} must be smaller than sample_steps={self.sample_steps}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ChaintuneError(f"lr_schedule must be one of {', '.join(LR_SCHEDULES)}, got {self.lr_schedule!r}")
        if self.spans < 1:
            raise ChaintuneError(f"spans={self.spans} must be >= 1")
        if self.mixed_precision not in ("no", "fp16", "bf16"):
            raise ChaintuneError("mixed_precision must be no, fp16 or bf16")
        if self.peft not in ("none", "lora"):
            raise ChaintuneError("align supports peft 'none' (full weights) or 'lora'")


def estimator_from_config(cfg: AlignConfig):
    from chaintune.estimators import get_estimator

    name = cfg.estimator
    j: str | tuple[int, int] = cfg.j
    if isinstance(j, str) and "," in j:
        a, b = (int(v) for v in j.split(","))
        j = (a, b)
    opts = {
        "rlr": {"h": cfg.h, "j": j, "sigma": cfg.sigma, "zo": cfg.zo, "ho": cfg.ho,
                "spans": cfg.spans, "shared_perturbation": cfg.shared_perturbation},
        "half-order": {"h": cfg.h},
        "zeroth-order": {"sigma": cfg.sigma, "shared": cfg.shared_perturbation},
        "truncated-backprop": {"k": cfg.k},
        "alignprop": {"k": cfg.k},
        "reinforce": {"inner_epochs": cfg.inner_epochs, "clip_range": cfg.clip_range},
        "ddpo": {"inner_epochs": cfg.inner_epochs, "clip_range": cfg.clip_range},
    }.get(name, {})
    return get_estimator(name, **opts)


def default_heldout(reward_spec: str) -> str | None:
    """digit:K -> digit-heldout:K (a different classifier judges the aligned samples)."""
    if reward_spec.startswith("digit:"):
        return "digit-heldout:" + reward_spec.split(":", 1)[1]
    return None


def _prompts(cfg: AlignConfig) -> list[str] | None:
    """Prompts from --prompt-file (.txt one a line with # comments, .json list, or builtin:NAME) or --prompt."""
    if cfg.prompt_file:
        from chaintune.prompts import load_prompts

        try:
            return load_prompts(cfg.prompt_file).prompts
        except (FileNotFoundError, ValueError) as e:
            raise ChaintuneError(str(e)) from e
    return cfg.prompts


def _stage_prompts(cfg: AlignConfig):
    """A StagePrompts when any per-stage prompt is set, else None."""
    if cfg.coarse_prompt is None and cfg.mid_prompt is None and cfg.fine_prompt is None:
        return None
    from chaintune.prompts import StagePrompts

    b1, b2 = (float(v) for v in cfg.stage_boundaries.split(","))
    return StagePrompts(coarse=cfg.coarse_prompt, mid=cfg.mid_prompt, fine=cfg.fine_prompt, boundaries=(b1, b2))


def _conditions(model, n: int, prompts, labels, cfg: AlignConfig, gen: torch.Generator) -> Conditions:
    from chaintune.sampling import make_conditions

    p = None if prompts is None else [prompts[int(i)] for i in torch.randint(0, len(prompts), (n,), generator=gen)]
    lab = None if labels is None else [labels[int(i)] for i in torch.randint(0, len(labels), (n,), generator=gen)]
    return make_conditions(model, n, labels=lab, prompts=p, guidance_scale=cfg.guidance_scale, generator=gen)


def pairwise_diversity(images: torch.Tensor) -> float:
    """Mean pairwise L2 distance between samples (per pixel): collapse to one image drives it to 0."""
    x = images.flatten(1).float()
    if len(x) < 2:
        return 0.0
    d = torch.cdist(x, x) / math.sqrt(x.shape[1])
    return float(d.sum() / (len(x) * (len(x) - 1)))


def nearest_real_distance(images: torch.Tensor) -> float:
    """Mean RMS pixel distance from each sample to its nearest real training digit (scikit-learn digits).

    Classifier rewards on 8x8 images are easy to fool with noise that a classifier calls a "3";
    samples that stay digits stay close to some real digit, so this rises when alignment hacks.
    """
    import torch.nn.functional as F

    from chaintune.data import digits_split

    real, _ = digits_split("train", 8)
    x = images.float().cpu()
    if x.shape[-1] != 8:
        x = F.interpolate(x, size=(8, 8), mode="bilinear", antialias=True, align_corners=False)
    d = torch.cdist(x.flatten(1), real.flatten(1)) / 8.0
    return float(d.min(1).values.mean())


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


def kl_to_base(model, frozen_copy, cfg: AlignConfig, sched, gen: torch.Generator, cond: Conditions) -> torch.Tensor:
    """Closed-form KL(p_theta(x_{i+1}|x_i) || p_base(x_{i+1}|x_i)) = |m - m_base|^2 / 2 std^2 at a random
    stochastic position i of a fresh rollout, times the number of steps (an unbiased estimate of the
    path KL's per-step sum)."""
    from chaintune.chain import run_chain, transition
    from chaintune.sampling import initial_noise

    n = cond.labels.shape[0] if cond.labels is not None else (len(cond.prompts) if cond.prompts else cfg.kl_samples)
    i = int(torch.randint(0, cfg.sample_steps - 1, (1,), generator=gen))
    x_T = initial_noise(model, n, gen)
    with torch.no_grad():
        tr = run_chain(model.denoise_fn(cond), sched, x_T, num_steps=cfg.sample_steps, eta=cfg.eta, generator=gen,
                       stop_at=i)
    from chaintune.chain import prepare_scheduler

    s = prepare_scheduler(sched, cfg.sample_steps, device=x_T.device)
    x_i, t = tr.latents[i], tr.timesteps[i]
    mean, std, _ = transition(s, model.denoise_fn(cond)(x_i, t.to(x_i.device)), int(t), x_i, cfg.eta)
    with torch.no_grad(), base_model_weights(model, frozen_copy):
        base_mean, _, _ = transition(s, model.denoise_fn(cond)(x_i, t.to(x_i.device)), int(t), x_i, cfg.eta)
    if float(std) <= 0:
        return torch.zeros((), device=x_i.device)
    kl = ((mean - base_mean) ** 2).flatten(1).sum(1) / (2 * std**2)
    return kl.mean() * (cfg.sample_steps - 1)


def retention_loss(model, bank: torch.Tensor, gen: torch.Generator, n: int) -> torch.Tensor:
    """Denoising loss on samples of the base model (keeps what the model knew; cf. Diff-Tuning)."""
    from chaintune.chain import add_noise, training_target

    idx = torch.randint(0, len(bank), (n,), generator=gen)
    x0 = bank[idx].to(model.device, model.dtype)
    noise = torch.randn(x0.shape, generator=gen).to(x0)
    t = torch.randint(0, model.scheduler.config.num_train_timesteps, (n,), generator=gen).to(x0.device)
    xt = add_noise(model.scheduler, x0, noise, t)
    pred = model.model_output(xt, t, model.default_conditions(n) if not model.conditional else Conditions())
    return torch.nn.functional.mse_loss(pred.float(), training_target(model.scheduler, x0, noise, t).float())


def reduce_gradients(params, acc, n_micro: int) -> None:
    """Average accumulated gradients over micro-batches and processes (explicit all-reduce).

    Every process contributes a gradient for every parameter (zeros where its estimator wrote
    none), so the collective calls match across processes.
    """
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        p.grad.div_(n_micro)
        if acc.num_processes > 1:
            p.grad.copy_(acc.reduce(p.grad, reduction="mean"))


def align(cfg: AlignConfig, *, overwrite: bool = False, resume: bool = False) -> Path:
    """Run reward alignment; returns the run directory (a model id for ``chaintune.load``)."""
    from accelerate import Accelerator

    import chaintune
    from chaintune.estimators import EstimationContext
    from chaintune.rewards import get_reward
    from chaintune.sampling import chain_scheduler, sample
    from chaintune.training import checkpoint as ckpt
    from chaintune.training.adapters import apply_peft, trainable_names
    from chaintune.training.logging import RunLogger
    from chaintune.training.runs import prepare_run_dir, save_tuned_model, write_run_info
    from chaintune.utils.images import save_grid
    from chaintune.utils.progress import progress

    cfg.validate()
    # resolve every name first: a typo must fail before anything is written
    reward = get_reward(cfg.reward)
    heldout_spec = default_heldout(cfg.reward) if cfg.heldout_reward == "auto" else cfg.heldout_reward
    heldout = get_reward(heldout_spec) if heldout_spec else None
    estimator = estimator_from_config(cfg)
    acc = Accelerator(mixed_precision=cfg.mixed_precision, cpu=cfg.device == "cpu")
    main = acc.is_main_process
    out = Path(cfg.out)
    if main:
        prepare_run_dir(out, overwrite=overwrite, resume=resume)
    acc.wait_for_everyone()

    # ---- model -------------------------------------------------------------------------------
    model = chaintune.load(cfg.model, device=str(acc.device), vae_chunk=cfg.vae_chunk)
    frozen = None
    if cfg.kl_weight > 0 and cfg.peft == "none":
        frozen = copy.deepcopy(model.denoiser).requires_grad_(False).eval()
    apply_peft(model.denoiser, cfg.peft, rank=cfg.lora_rank)
    if cfg.gradient_checkpointing and hasattr(model.denoiser, "enable_gradient_checkpointing"):
        pass  # the chain checkpoints whole model calls (EstimationContext.checkpoint); no double recompute
    params = [p for p in model.denoiser.parameters() if p.requires_grad]
    from chaintune.training.optim import make_optimizer

    opt = make_optimizer(params, lr=cfg.lr, weight_decay=cfg.weight_decay, eight_bit=cfg.eight_bit_adam)
    from diffusers.optimization import get_scheduler

    lr_sched = get_scheduler(LR_SCHEDULES[cfg.lr_schedule], opt, num_warmup_steps=cfg.warmup_steps,
                             num_training_steps=cfg.steps)
    sched = chain_scheduler(model, cfg.scheduler)
    stages = _stage_prompts(cfg)
    if stages is not None:  # every denoiser closure (training, KL, eval) then switches prompts by chain position
        from chaintune.prompts import StagedModel

        model = StagedModel(model, stages, steps=cfg.sample_steps, scheduler=sched)
    prompts, labels = _prompts(cfg), cfg.labels
    gen = torch.Generator().manual_seed(cfg.seed * 1000 + acc.process_index)
    bank = None
    if cfg.retention_weight > 0:
        bank = sample(model, cfg.retention_samples, steps=cfg.sample_steps, eta=cfg.eta,
                      generator=torch.Generator().manual_seed(cfg.seed + 99), scheduler=sched, decode=False).x0

    start_step = 0
    state = {"bad_steps": 0}
    if resume:
        start_step = ckpt.restore(out, model.denoiser, opt, lr_sched, gen, state, estimator=estimator)
        if main:
            ckpt.truncate_metrics(out, start_step)
    if main:
        write_run_info(out, {"command": "align", "base_model": cfg.model, "peft": cfg.peft, "status": "running",
                             "trainable_parameters": sum(p.numel() for p in params),
                             "trainable_tensors": len(trainable_names(model.denoiser)), "config": asdict(cfg)})
        ckpt.save_config(out, asdict(cfg))
    logger = RunLogger(out, tensorboard=cfg.tensorboard) if main else None

    def evaluate(step: int) -> dict:
        eval_gen = torch.Generator().manual_seed(10_000 + cfg.seed)  # held-out seeds: never used in training
        c = _conditions(model, cfg.eval_samples, prompts, labels, cfg, eval_gen)
        with acc.autocast():
            tr = sample(model, cfg.eval_samples, steps=cfg.sample_steps, eta=cfg.eta, generator=eval_gen,
                        labels=c.labels, prompts=c.prompts, guidance_scale=c.guidance_scale, scheduler=sched)
        with torch.no_grad():
            row = {"step": step, "eval/reward": float(reward(tr.images, prompts=c.prompts, labels=c.labels).mean()),
                   "eval/diversity": pairwise_diversity(tr.images)}
            if heldout is not None:
                row["eval/heldout_reward"] = float(heldout(tr.images, prompts=c.prompts, labels=c.labels).mean())
            if cfg.reward.startswith("digit:"):
                from chaintune.classifiers import load_classifier

                k = int(cfg.reward.split(":")[1])
                row["eval/class_share"] = float((load_classifier("digits-mlp")(tr.images).argmax(1) == k)
                                                .float().mean())
                row["eval/nn_distance"] = nearest_real_distance(tr.images)
        if main:
            save_grid(tr.images[:64], out / "samples" / f"step_{step:06d}.png")
        return row

    # ---- the loop ----------------------------------------------------------------------------
    if main and start_step == 0:
        logger.log(evaluate(0))
    bar = progress(range(start_step, cfg.steps), desc=f"align {cfg.estimator}", total=cfg.steps,
                   disable=not (main and cfg.progress), initial=start_step)
    t_start = time.time()
    for step in bar:
        model.denoiser.train()
        ctxs = []
        for _ in range(cfg.grad_accum):
            c = _conditions(model, cfg.batch_size, prompts, labels, cfg, gen)
            ctxs.append(EstimationContext(model=model, reward=reward, n=cfg.batch_size, steps=cfg.sample_steps,
                                          eta=cfg.eta, scheduler=sched, generator=gen, conditions=c,
                                          checkpoint=cfg.gradient_checkpointing, baseline=cfg.baseline,
                                          autocast=acc.autocast))
        iters = [estimator.updates(c) for c in ctxs]
        rewards, extras = [], {}
        while True:
            got = []
            for it in iters:
                s = next(it, None)
                if s is not None:
                    got.append(s)
            if not got:
                break
            rewards += [s.rewards.float().cpu() for s in got]
            for s in got:
                extras.update({k: v for k, v in s.extra.items() if isinstance(v, (int, float))})
            guard = {}
            if cfg.kl_weight > 0:
                kl_cond = _conditions(model, cfg.kl_samples, prompts, labels, cfg, gen)
                with acc.autocast():
                    kl = kl_to_base(model, frozen, cfg, sched, gen, kl_cond)
                (cfg.kl_weight * kl * len(got)).backward()
                guard["kl"] = float(kl.detach())
            if bank is not None:
                with acc.autocast():
                    ret = retention_loss(model, bank, gen, cfg.batch_size)
                (cfg.retention_weight * ret * len(got)).backward()
                guard["retention_loss"] = float(ret.detach())
            reduce_gradients(params, acc, len(got))
            finite = all(p.grad is None or torch.isfinite(p.grad).all() for p in params)
            if not finite:
                state["bad_steps"] += 1
                opt.zero_grad(set_to_none=True)
                if main:
                    bar.write(f"warning: step {step + 1}: non-finite gradient, update skipped "
                              f"({state['bad_steps']}/{cfg.max_bad_steps} in a row)", file=sys.stderr)
                if state["bad_steps"] >= cfg.max_bad_steps:
                    if main:
                        write_run_info(out, {"command": "align", "base_model": cfg.model, "peft": cfg.peft,
                                             "status": "failed: non-finite gradients", "config": asdict(cfg)})
                    raise ChaintuneError(
                        f"{cfg.max_bad_steps} non-finite gradients in a row at step {step + 1}; stopped. The last good "
                        f"checkpoint in {out / 'checkpoints'} is intact (lower --lr or check the reward)")
                continue
            state["bad_steps"] = 0
            gnorm = float(torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm))
            opt.step()
            lr_sched.step()
            opt.zero_grad(set_to_none=True)
            extras.update(guard)
            extras["grad_norm"] = gnorm
        r = torch.cat(rewards) if rewards else torch.zeros(1)
        r = acc.gather(r.to(acc.device)).cpu() if acc.num_processes > 1 else r
        row = {"step": step + 1, "reward_mean": float(r.mean()), "reward_std": float(r.std()) if len(r) > 1 else 0.0,
               "lr": lr_sched.get_last_lr()[0], "time": time.time() - t_start, **extras}
        bar.set_postfix(reward=f"{row['reward_mean']:.3f}")
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
            row.update(evaluate(step + 1))
        if main:
            logger.log(row)
        if (step + 1) % cfg.save_every == 0 or step + 1 == cfg.steps:
            acc.wait_for_everyone()
            if main:
                ckpt.save(out, step + 1, model.denoiser, opt, lr_sched, gen, state, keep=cfg.keep_checkpoints,
                          estimator=estimator)
    # ---- save ----------------------------------------------------------------------------
    acc.wait_for_everyone()
    if main:
        model.denoiser.eval()
        save_tuned_model(out, model, cfg.peft, cfg.lora_rank)
        write_run_info(out, {"command": "align", "base_model": cfg.model, "peft": cfg.peft, "status": "finished",
                             "trainable_parameters": sum(p.numel() for p in params), "config": asdict(cfg)})
        logger.close()
    return out


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
