"""Train a ControlNet over a frozen base model, with Diff-Tuning's timestep law or plain (uniform) timesteps.

The ControlNet (diffusers ``ControlNetModel.from_unet``: a copy of the base UNet's encoder whose exits are
zero convolutions, so it starts as an exact no-op) learns to steer the frozen base; the loss is the base's
own denoising loss with the ControlNet's residuals added:

    L = E_{x, c = condition(x), y, t ~ p(t), eps} || target - eps_base(x_t, t, y; ControlNet(x_t, t, y, c)) ||^2

How Diff-Tuning applies here (the paper gives no ControlNet code, so this is our reading, and why):
Diff-Tuning = reconsolidation with t ~ psi(t) ∝ (t + 1)^alpha + retention of the pretrained denoiser
where it is still good (small t). Training a ControlNet freezes the base, so retention is already exact:
nothing of the pretrained denoiser can be forgotten, and the knowledge-bank term (trained on the null
branch of the *same* weights) would have no trainable weights of its own to act on. What remains is
psi: the chain of forgetting says the domain-specific work — here, laying out the image the condition
describes — happens at large t, while near t = 0 the base already denoises well whatever the control.
Spending the ControlNet's samples where the control decides the image is the paper's mechanism for its
faster "sudden convergence". ``--timestep-law uniform`` (and ``--method plain``) is the ablation.

Labels/prompts are dropped to the null condition with probability ``label_dropout`` (ControlNet's 50%), so
the control alone must carry the image and CFG keeps working. Evaluation samples the *null* condition
with held-out control images (fixed noise, DDIM eta 0), so what it measures is the control's doing:
``eval/condition_iou`` (IoU of the condition extracted from each sample with the given one) and, for
digit data, ``eval/digit_agreement`` (the shipped digits-cnn classifier's label of the sample equals the
digit the condition came from).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

import chaintune
from chaintune.backends.base import DiffusionModel
from chaintune.backends.controlled import ControlledModel, new_controlnet
from chaintune.chain import StepGrad, add_noise, run_chain, training_target
from chaintune.classifiers import load_classifier
from chaintune.controlnet.config import ControlNetConfig
from chaintune.data.conditions import condition_iou, extract
from chaintune.errors import ChaintuneError
from chaintune.run.trainer import Evaluation, Objective, RunResult, Trainer
from chaintune.sampling import chain_scheduler, initial_noise, make_conditions
from chaintune.transfer.conditioning import target_conditions
from chaintune.transfer.data import encode, hold_out, load_target
from chaintune.transfer.timesteps import sample_timesteps

__all__ = ["ControlNetObjective", "train_controlnet", "sample_controlled", "control_images", "split_control_data",
           "judged_by_digits", "control_metrics"]


def control_images(model: ControlledModel | DiffusionModel, kind: str, images: torch.Tensor,
                   channels: int | None = None) -> torch.Tensor:
    """Condition maps of ``images`` ([0, 1]) with the ControlNet's channel count (grey maps repeated)."""
    maps = extract(kind, images)
    c = channels or getattr(model, "conditioning_channels", 1)
    return maps.repeat(1, c, 1, 1) if c > 1 else maps


def split_control_data(base: DiffusionModel, data: str, eval_data: str = "auto",
                       given: tuple[torch.Tensor, torch.Tensor] | None = None,
                       given_eval: tuple[torch.Tensor, torch.Tensor] | None = None):
    """Training images (x, y) and held-out ones (ex, ey) whose conditions steer a ControlNet: ``eval_data``
    ``auto`` is digits:test for digit data, else the last 10% of ``data`` (taken out of training)."""
    x, y = given if given is not None else load_target(base, data)
    if given_eval is not None:
        ex, ey = given_eval
    elif eval_data == "auto" and data.partition(":")[0] in ("digits", "digits-fewshot"):
        ex, ey = load_target(base, "digits:test")
    elif eval_data == "auto":
        x, y, ex, ey = hold_out(x, y, data)
    else:
        ex, ey = load_target(base, eval_data)
    if not len(x):
        raise ChaintuneError(f"{data} holds no images")
    return x, y, ex, ey


def judged_by_digits(data: str, labels: torch.Tensor) -> bool:
    """Whether the shipped digit classifier can judge samples drawn from ``data``'s conditions."""
    return bool(data.partition(":")[0] in ("digits", "digits-fewshot") and len(labels) and int(labels.max()) < 10)


def control_metrics(kind: str, images: torch.Tensor, maps: torch.Tensor,
                    digits: torch.Tensor | None = None) -> dict[str, float]:
    """How well samples follow their controls: ``condition_iou`` (IoU of the condition extracted from each sample
    with its map) and, given the digits the controls came from, ``digit_agreement`` (share the shipped digits-cnn
    labels as that digit)."""
    metrics = {"eval/condition_iou": float(condition_iou(kind, images, maps).mean())}
    if digits is not None:
        with torch.no_grad():
            pred = load_classifier("digits-cnn")(images).argmax(1).cpu()
        metrics["eval/digit_agreement"] = float((pred == digits.cpu()).float().mean())
    return metrics


@torch.no_grad()
def sample_controlled(model: ControlledModel, control: torch.Tensor, *, steps: int = 20, eta: float = 0.0,
                      generator: torch.Generator | None = None, labels=None, prompts=None,
                      guidance_scale: float | None = None, scheduler: str = "ddim", batch_size: int = 64,
                      x_T: torch.Tensor | None = None) -> torch.Tensor:
    """Images [n, C, H, W] in [0, 1] for the control images ``control`` ([n, C', H, W], one sample each).

    Without labels/prompts the model's null condition is used: the control alone steers the sample."""

    n = len(control)
    if labels is None and prompts is None:
        cond = model.null_conditions(n)
        if guidance_scale is not None:
            cond.guidance_scale = float(guidance_scale)
    else:
        cond = make_conditions(model, n, labels=labels, prompts=prompts, guidance_scale=guidance_scale,
                               generator=generator)
    sched = chain_scheduler(model, scheduler)
    x_T = initial_noise(model, n, generator) if x_T is None else x_T.to(model.device, model.dtype)
    out = []
    for s in range(0, n, batch_size):
        idx = list(range(s, min(n, s + batch_size)))
        c = cond.subset(idx)
        c.control = control[idx].to(model.device, model.dtype)
        traj = run_chain(model.denoise_fn(c), sched, x_T[idx], num_steps=steps, eta=eta, generator=generator,
                         modes=StepGrad.NONE)
        out.append(model.decode(traj.x0).float().cpu())
    return torch.cat(out)


class ControlNetObjective(Objective):
    """The base model's denoising loss through a trainable ControlNet (base frozen), t ~ psi or uniform."""

    command = "controlnet"
    evaluate_at_start = True  # the no-op ControlNet's score: the "before" of the convergence curve
    progress_key = "loss"

    def __init__(self, cfg: ControlNetConfig, base: DiffusionModel | None = None,
                 data: tuple[torch.Tensor, torch.Tensor] | None = None,
                 eval_data: tuple[torch.Tensor, torch.Tensor] | None = None):
        self.cfg, self.given_base, self.data, self.eval_data = cfg, base, data, eval_data

    def prepare(self, run: Trainer) -> None:
        cfg = self.cfg
        base = self.given_base.to(run.device) if self.given_base is not None \
            else chaintune.load(cfg.model, device=str(run.device))
        controlnet = new_controlnet(base)
        self.model = ControlledModel(base, controlnet, cfg.condition, cfg.control.conditioning_scale,
                                     source=f"controlnet over {cfg.model}")
        x, y, ex, ey = split_control_data(base, cfg.data, cfg.eval.eval_data, self.data, self.eval_data)
        self.x0_all = encode(base, x).to(run.device)
        self.y = y.long()
        self.control_all = control_images(self.model, cfg.condition, x)
        n_eval = min(cfg.eval.eval_samples, len(ex))
        self.eval_images, self.eval_labels = ex[:n_eval].float(), ey[:n_eval].long()
        self.eval_control = control_images(self.model, cfg.condition, self.eval_images)
        self.eval_maps = extract(cfg.condition, self.eval_images)
        self.digits = judged_by_digits(cfg.data, ey)
        if cfg.optim.gradient_checkpointing:
            controlnet.enable_gradient_checkpointing()
        g = torch.Generator().manual_seed(cfg.run.seed + 4242)
        self.eval_noise = torch.randn((n_eval, *base.latent_shape), generator=g)

    def updates(self, run: Trainer, step: int):
        cfg, g, model = self.cfg, run.generator, self.model
        sched = model.scheduler
        total = 0.0
        n = cfg.optim.batch_size
        law, alpha = cfg.law(), cfg.control.alpha
        for _ in range(cfg.optim.grad_accum):
            idx = torch.randint(0, len(self.x0_all), (n,), generator=g)
            x0 = self.x0_all[idx.to(self.x0_all.device)]
            cond = target_conditions(model, self.y[idx], cfg.control.label_dropout, cfg.control.prompt, None, g)
            cond.control = self.control_all[idx].to(run.device, model.dtype)
            t = sample_timesteps(n, sched.config.num_train_timesteps, law, alpha, generator=g).to(x0.device)
            noise = torch.randn(x0.shape, generator=g).to(x0)
            xt = add_noise(sched, x0, noise, t)
            with run.autocast():
                out = model.model_output(xt, t, cond)
            loss = F.mse_loss(out.float(), training_target(sched, x0, noise, t).float())
            loss.backward()
            total += float(loss.detach()) / cfg.optim.grad_accum
        yield cfg.optim.grad_accum, {"loss": total}

    def evaluate(self, run: Trainer, step: int) -> Evaluation | None:
        ev = self.cfg.eval
        images = sample_controlled(self.model, self.eval_control, steps=ev.sample_steps, eta=ev.sample_eta,
                                   generator=torch.Generator().manual_seed(self.cfg.run.seed + 777),
                                   x_T=self.eval_noise)
        metrics = control_metrics(self.cfg.condition, images, self.eval_maps, self.eval_labels if self.digits else None)
        k = min(ev.grid_samples, len(images))
        cond_rgb = self.eval_maps[:k].repeat(1, images.shape[1], 1, 1)
        pairs = torch.stack([cond_rgb, images[:k]], 1).flatten(0, 1)  # condition, sample, condition, sample ...
        return Evaluation(metrics, pairs, score=metrics["eval/condition_iou"])

    def info(self) -> dict:
        return {"base_model": self.cfg.model, "condition": self.cfg.condition, "method": self.cfg.method,
                "timestep_law": self.cfg.law()}


def train_controlnet(config: ControlNetConfig | dict, out: str | Path | None = None, *, overwrite: bool = False,
                     resume: bool = False, show_progress: bool | None = None, base: DiffusionModel | None = None,
                     data: tuple[torch.Tensor, torch.Tensor] | None = None,
                     eval_data: tuple[torch.Tensor, torch.Tensor] | None = None, **trainer: Any) -> RunResult:
    """Train a ControlNet for ``config.model`` on ``config.data``; with ``out``, a run directory whose ``model/``
    is a diffusers ControlNet pipeline (base + ``controlnet/``). ``base``/``data``/``eval_data`` may be given
    directly (tests, benchmarks)."""
    cfg = ControlNetConfig.from_dict(config) if isinstance(config, dict) else config
    obj = ControlNetObjective(cfg, base, data, eval_data)
    return Trainer(cfg, obj, out=out, overwrite=overwrite, resume=resume, show_progress=show_progress,
                   **trainer).fit()
