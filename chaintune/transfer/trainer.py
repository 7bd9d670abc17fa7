"""Transfer a pretrained diffusion model to a new domain: Diff-Tuning or plain fine-tuning.

Diff-Tuning (Zhong et al., NeurIPS 2024) exploits the chain of forgetting: the pretrained
denoiser is still good near t = 0 and domain specific near t = T. Each batch mixes target
images (share ``1 - bank_share``) with knowledge-bank samples of the pretrained model
(share ``bank_share``, trained on the unconditional branch) and minimises

    L = mean_target ||target - f(x_t, t, y)||^2            t ~ psi(t) ∝ (t + 1)^alpha
        + lam * mean_bank ||target - f(x^_t, t, null)||^2   t ~ xi(t)  ∝ (T - t)^beta

(``timestep_mode='weighting'`` draws t uniformly and weights each loss by T p(t) instead).
``method='plain'`` is standard fine-tuning: target only, uniform t. Diff-Tuning with ``lam=0`` or
``bank_share=0`` keeps only psi: no bank is built and the whole batch is target data. Any PEFT
method (LoRA, BitFit, DiffFit) can be combined with either; an EMA of the trainable weights is
what is evaluated and saved.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import chaintune
from chaintune.backends.base import DiffusionModel
from chaintune.errors import ChaintuneError
from chaintune.metrics import feature_network, fid_kid
from chaintune.run.pilot import parse_lrs, pilot_steps, run_pilot
from chaintune.run.rundir import check_run_dir
from chaintune.run.trainer import Evaluation, Objective, RunResult, Trainer
from chaintune.transfer.bank import KnowledgeBank, build_bank
from chaintune.transfer.conditioning import target_conditions
from chaintune.transfer.config import FEW_SHOT_RETENTION_WINS, UNCONDITIONAL_RETENTION, TransferConfig
from chaintune.transfer.data import default_eval_data, default_feature, encode, generate, hold_out, load_target
from chaintune.transfer.folding import fold_difffit, has_difffit
from chaintune.transfer.forgetting import measure_schedule
from chaintune.transfer.loss import diff_tuning_loss

__all__ = ["TransferResult", "transfer"]


@dataclass
class TransferResult(RunResult):
    bank: KnowledgeBank | None = None


def _folded(model: DiffusionModel) -> DiffusionModel:
    """A shallow copy whose denoiser has DiffFit scales folded in (a plain diffusers module)."""

    if not has_difffit(model.denoiser):
        return model
    return model.with_denoiser(fold_difffit(copy.deepcopy(model.denoiser)))



class TransferObjective(Objective):
    """Diff-Tuning's (or plain fine-tuning's) denoising loss on target images and the knowledge bank."""

    command = "transfer"

    def __init__(self, cfg: TransferConfig, model: DiffusionModel | None = None,
                 target: tuple[torch.Tensor, torch.Tensor] | None = None, eval_images: torch.Tensor | None = None):
        self.cfg, self.given_model, self.target, self.eval_images = cfg, model, target, eval_images
        self.bank: KnowledgeBank | None = None
        self.pilot: dict | None = None  # what `--pilot` probed and chose, for the status file and report

    def prepare(self, run: Trainer) -> None:
        cfg = self.cfg
        model = self.given_model.to(run.device) if self.given_model is not None \
            else chaintune.load(cfg.model, device=str(run.device))
        run.threads_for(model)  # encoding the data and sampling the bank run under the rule
        target = self.target if self.target is not None else load_target(model, cfg.data)
        x_img, y = target
        # data with per-sample prompts (LabelledData.prompted) names each label by its prompt: by default every
        # sample trains on its own prompt; class names fill --prompt's {label}
        self.classes = getattr(target, "classes", None)
        self.prompt = cfg.diff_tuning.prompt or ("{label}" if getattr(target, "prompted", False) else "")
        if model.class_conditional and len(y) and int(y.max()) >= model.num_classes:
            raise ChaintuneError(f"{cfg.data} has labels up to {int(y.max())} but {cfg.model} has "
                                 f"{model.num_classes} classes")
        shots = len(y) / max(1, len(torch.unique(y)))
        if cfg.retains() and not model.has_null_branch and shots > FEW_SHOT_RETENTION_WINS:
            warnings.warn(UNCONDITIONAL_RETENTION.format(shots=shots), UserWarning, stacklevel=4)
        self.model, self.y = model, y
        self.x0_all = encode(model, x_img)
        ev = cfg.eval
        self.eval_name = default_eval_data(cfg.data) if ev.eval_data == "auto" else ev.eval_data
        self.feature = default_feature(cfg.data) if ev.feature == "auto" else ev.feature
        if self.eval_images is None and self.eval_name and self.feature:
            self.eval_images = load_target(model, self.eval_name)[0]
        self.fid = bool(self.feature) and self.eval_images is not None
        if self.fid:
            feature_network(self.feature)  # fail now, not after training, on a bad feature spec
        self.n_bank = cfg.bank_batch()
        self.n_target = cfg.optim.batch_size - self.n_bank
        if self.n_bank:
            self.bank = build_bank(model, cfg.bank, cfg.bank.dir, progress=run.bars)
            how = "sampled and cached" if self.bank.generated else "reused from the cache"
            run.log_line(f"knowledge bank: {len(self.bank)} samples {how} at {self.bank.path}")
            self.bank_x0 = self.bank.latents.to(run.device)
        if cfg.optim.gradient_checkpointing and hasattr(model.denoiser, "enable_gradient_checkpointing"):
            model.denoiser.enable_gradient_checkpointing()

    def updates(self, run: Trainer, step: int):
        cfg, dt, g = self.cfg, self.cfg.diff_tuning, run.generator
        sums: dict[str, float] = {"loss": 0.0, "recon": 0.0, "retention": 0.0}
        for _ in range(cfg.optim.grad_accum):
            idx = torch.randint(0, len(self.x0_all), (self.n_target,), generator=g)
            cond = target_conditions(self.model, self.y[idx], dt.label_dropout, self.prompt, self.classes, g)
            bank_x0 = None
            if self.n_bank:
                bank_x0 = self.bank_x0[torch.randint(0, len(self.bank_x0), (self.n_bank,), generator=g).to(run.device)]
            with run.autocast():
                parts = diff_tuning_loss(self.model, self.x0_all[idx].to(run.device), cond, bank_x0, alpha=dt.alpha,
                                         beta=dt.beta, lam=dt.lam, mode=dt.timestep_mode, generator=g,
                                         psi=cfg.method == "diff-tuning")
            parts.total.backward()
            for k, v in (("loss", parts.total), ("recon", parts.recon), ("retention", parts.retention)):
                sums[k] += float(v.detach()) / cfg.optim.grad_accum
        yield cfg.optim.grad_accum, sums

    def evaluate(self, run: Trainer, step: int) -> Evaluation | None:
        ev = self.cfg.eval
        if run.out is None and not self.fid:
            return None  # nothing to write and nothing to measure
        n = max(ev.eval_samples, ev.grid_samples) if self.fid else ev.grid_samples
        images = generate(self.model, n, ev.sample_steps, ev.sample_eta, seed=self.cfg.run.seed + 12345,
                          classes=self.y, guidance_scale=ev.sample_guidance,
                          progress=f"evaluation samples (step {step})" if run.bars else None)
        metrics: dict = {}
        if self.fid:
            metrics = fid_kid(self.eval_images, images[: ev.eval_samples], self.feature)
        return Evaluation(metrics, images[: ev.grid_samples])

    def export(self) -> DiffusionModel:
        return _folded(self.model)

    def info(self) -> dict:
        # the model actually trained (one passed in Python may not be the configured id): what load() needs for adapter/
        info = {"base_model": self.model.source or self.cfg.model,
                "bank": str(self.bank.path) if self.bank is not None else None,
                "eval_data": self.eval_name, "feature": self.feature}
        if self.pilot is not None:
            info["pilot"] = self.pilot
        return info


def transfer(config: TransferConfig | dict, out: str | Path | None = None, *, overwrite: bool = False,
             resume: bool = False, show_progress: bool | None = None, model: DiffusionModel | None = None,
             target: tuple[torch.Tensor, torch.Tensor] | None = None, eval_images: torch.Tensor | None = None,
             **trainer: Any) -> TransferResult:
    """Fine-tune ``config.model`` on ``config.data``; with ``out``, write a run directory (a model id).

    ``model`` / ``target`` / ``eval_images`` may be given directly (tests, benchmarks, notebooks);
    otherwise they are loaded from the ids in the config. ``resume`` continues the run in ``out`` from
    its latest checkpoint (weights, EMA, optimizer, LR schedule, RNG states), bit-identically.
    """
    cfg = TransferConfig.from_dict(config) if isinstance(config, dict) else config
    pilot = None
    if cfg.pilot.pilot and not resume:
        cfg.validate()
        if out is not None:  # a refused --out fails before the probes
            check_run_dir(out, overwrite=overwrite, resume=resume)
        cfg, pilot = transfer_pilot(cfg, model=model, target=target, eval_images=eval_images, **trainer)
    obj = TransferObjective(cfg, model, target, eval_images)
    obj.pilot = pilot
    res = Trainer(cfg, obj, out=out, overwrite=overwrite, resume=resume, show_progress=show_progress,
                  **trainer).fit()
    return TransferResult(**vars(res), bank=obj.bank)


def transfer_pilot(cfg: TransferConfig, *, model: DiffusionModel | None = None,
                   target: tuple[torch.Tensor, torch.Tensor] | None = None, eval_images: torch.Tensor | None = None,
                   log=print, **trainer: Any) -> tuple[TransferConfig, dict]:
    """``--pilot``'s probes over --pilot-methods x --pilot-lrs (:mod:`chaintune.run.pilot`), each judged by FID
    against held-out images: the data's test split (``--eval-data``, auto for the built-ins), else its last 10%,
    which the probes then do not train on. With both methods probed (and ``--pilot-schedule``), one more probe:
    Diff-Tuning at its best LR with alpha, beta and lam derived from the chain of forgetting of the best plain probe
    on the held-out images (:func:`chaintune.transfer.forgetting.measure_schedule`). Returns the full run's config
    (pilot off) and the pilot's record."""
    base = model if model is not None else chaintune.load(cfg.model)
    x, y = target if target is not None else load_target(base, cfg.data)
    held, held_y = eval_images, None
    if held is None:
        name = default_eval_data(cfg.data) if cfg.eval.eval_data == "auto" else cfg.eval.eval_data
        if name:
            held, held_y = load_target(base, name)
        else:
            x, y, held, held_y = hold_out(x, y, cfg.data, what="--eval-data (images the pilot judges on)")
    feature = default_feature(cfg.data) if cfg.eval.feature == "auto" else cfg.eval.feature
    if not feature:
        raise ChaintuneError("the pilot judges its probes by FID and this data has no default features: pass "
                             "--feature inception:/path/to/weights (or digits-cnn for digit-like data)")
    steps = pilot_steps(cfg.optim.steps, cfg.pilot.pilot_steps)
    methods = cfg.pilot.methods()
    grid = [{"method": m, "lr": lr} for m in methods for lr in parse_lrs(cfg.pilot.pilot_lrs)]
    derive = cfg.pilot.pilot_schedule and {"plain", "diff-tuning"} <= set(methods)
    best_plain: dict = {"score": float("-inf")}  # the best plain probe's model: its chain of forgetting, the schedule
    derived: dict = {}

    def apply(c: TransferConfig, point: dict) -> None:
        c.method, c.optim.lr, c.pilot.pilot = point["method"], point["lr"], False
        for key in ("alpha", "beta", "lam"):
            if key in point:
                setattr(c.diff_tuning, key, point[key])

    def fit(c: TransferConfig) -> tuple[float, float, list[str]]:
        c.optim.steps, c.eval.eval_every, c.eval.feature = steps, 0, feature
        c.run.tensorboard = c.run.report = False
        res = Trainer(c, TransferObjective(c, copy.deepcopy(base), (x, y), held), out=None, show_progress=False,
                      **trainer).fit()
        score = -float(res.final.get("fid", float("nan")))
        if derive and c.method == "plain" and score > best_plain["score"]:  # one model kept, not one a probe
            best_plain.update(score=score, model=res.model)
        return score, float("nan"), []

    def follow_up(probes: list) -> list[dict]:
        """Diff-Tuning with the schedule the best plain probe's chain of forgetting calls for."""
        tuned = [p for p in probes if p.settings["method"] == "diff-tuning" and p.usable]
        if "model" not in best_plain or not tuned:  # no derivation asked for (best_plain empty), or nothing usable
            return []
        derived.update(measure_schedule(base, best_plain.pop("model"), held, held_y, seed=cfg.run.seed,
                                        lam=cfg.diff_tuning.lam))
        log(f"pilot: the best plain probe's gain over the base centres on t ~ "
            f"{derived.get('gain_mean_t', float('nan')):.0f} of {base.scheduler.config.num_train_timesteps}: alpha "
            f"{derived['alpha']:g}, beta {derived['beta']:g}, lambda {derived['lam']:g}")
        lr = max(tuned, key=lambda p: p.score).settings["lr"]
        return [{"method": "diff-tuning", "lr": lr, "alpha": derived["alpha"], "beta": derived["beta"],
                 "lam": derived["lam"]}]

    full, record = run_pilot(cfg, grid, apply, steps, fit, score_name="-FID (held out)", log=log,
                             follow_up=follow_up)
    if derived:
        record["schedule"] = derived
    return full, record
