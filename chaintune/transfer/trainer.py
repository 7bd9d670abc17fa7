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
import json
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from chaintune.backends.base import DiffusionModel
from chaintune.errors import ChaintuneError
from chaintune.transfer.bank import KnowledgeBank, build_bank
from chaintune.transfer.conditioning import target_conditions
from chaintune.transfer.config import UNCONDITIONAL_RETENTION, TransferConfig
from chaintune.transfer.data import default_eval_data, default_feature, encode, generate, load_target
from chaintune.transfer.loss import diff_tuning_loss

__all__ = ["TransferResult", "transfer"]


@dataclass
class TransferResult:
    model: DiffusionModel
    history: list[dict] = field(default_factory=list)
    final: dict = field(default_factory=dict)
    bank: KnowledgeBank | None = None
    trainable: list[str] = field(default_factory=list)


def _folded(model: DiffusionModel) -> DiffusionModel:
    """A shallow copy whose denoiser has DiffFit scales folded in (a plain diffusers module)."""
    from chaintune.transfer.folding import fold_difffit, has_difffit

    if not has_difffit(model.denoiser):
        return model
    m = copy.copy(model)
    m.denoiser = fold_difffit(copy.deepcopy(model.denoiser))
    if hasattr(m, "pipe"):
        m.pipe = copy.copy(model.pipe)
        m.pipe.unet = m.denoiser
    return m


# --------------------------------------------------------------------------- the trainer


def _append_jsonl(path: Path, row: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()


def transfer(config: TransferConfig | dict, out: str | Path | None = None, *, overwrite: bool = False,
             resume: bool = False, show_progress: bool = True, model: DiffusionModel | None = None,
             target: tuple[torch.Tensor, torch.Tensor] | None = None,
             eval_images: torch.Tensor | None = None) -> TransferResult:
    """Fine-tune ``config.model`` on ``config.data``; with ``out``, write a run directory (a model id).

    ``model`` / ``target`` / ``eval_images`` may be given directly (tests, benchmarks, notebooks);
    otherwise they are loaded from the ids in the config. ``resume`` continues the run in ``out`` from
    its latest checkpoint (weights, EMA, optimizer, LR schedule, RNG states), bit-identically.
    """
    import chaintune
    from chaintune.training.adapters import apply_peft
    from chaintune.utils.progress import progress

    cfg = TransferConfig.from_dict(config) if isinstance(config, dict) else config
    cfg.validate()
    run_dir = None
    if out is not None and Path(out).exists() and any(Path(out).iterdir()) and not (overwrite or resume):
        raise ChaintuneError(f"{out} already holds files; pass --overwrite to replace it")
    device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(cfg.seed)
    g = torch.Generator().manual_seed(cfg.seed)

    if model is None:
        model = chaintune.load(cfg.model, device=device)
    else:
        model.to(device)
    if target is None:
        target = load_target(model, cfg.data)
    x_img, y = target
    classes = None
    if model.class_conditional and len(y):
        if int(y.max()) >= model.num_classes:
            raise ChaintuneError(f"{cfg.data} has labels up to {int(y.max())} but {cfg.model} has "
                                 f"{model.num_classes} classes")
    if cfg.retains() and model.kind == "unet" and not model.conditional:
        warnings.warn(UNCONDITIONAL_RETENTION, UserWarning, stacklevel=2)
    x0_all = encode(model, x_img)

    bank = None
    n_bank = cfg.bank_batch()
    if n_bank:
        bank = build_bank(model, cfg.bank_config(), cfg.bank_dir)
        bank_x0 = bank.latents.to(device)

    eval_name = default_eval_data(cfg.data) if cfg.eval_data == "auto" else cfg.eval_data
    feature = default_feature(cfg.data) if cfg.feature == "auto" else cfg.feature
    if eval_images is None and eval_name and feature:
        eval_images = load_target(model, eval_name)[0]
    if feature and eval_images is not None:
        from chaintune.metrics import feature_network

        feature_network(feature)  # fail now, not after training, on a bad feature spec

    if out is not None:  # only now: a bad model/data id leaves no half-made run directory behind
        from chaintune.training.runs import prepare_run_dir, write_run_info

        run_dir = prepare_run_dir(out, overwrite=overwrite, resume=resume)
        (run_dir / "samples").mkdir(exist_ok=True)
        _write_config(run_dir, cfg)
        info = {"command": "transfer", "base_model": cfg.model, "peft": cfg.peft, "config": asdict(cfg),
                "status": "running"}
        write_run_info(run_dir, info)

    trainable = apply_peft(model.denoiser, cfg.peft, rank=cfg.lora_rank)
    params = [p for p in model.denoiser.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    lr_at = (lambda s: min(1.0, (s + 1) / cfg.warmup_steps)) if cfg.warmup_steps else (lambda s: 1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    from diffusers.training_utils import EMAModel

    ema = EMAModel(params, decay=cfg.ema_decay)
    start = 0
    if resume:
        from chaintune.training import checkpoint as ckpt

        if run_dir is None:
            raise ChaintuneError("resume needs the run directory (out)")
        start = ckpt.restore(run_dir, model.denoiser, opt, sched, g, {}, ema=ema)
        ckpt.truncate_metrics(run_dir, start)
    model.denoiser.train()
    n_tgt = cfg.batch_size - n_bank
    history: list[dict] = []
    metrics_path = run_dir / "metrics.jsonl" if run_dir else None

    def evaluate(step: int) -> dict:
        if run_dir is None and not (feature and eval_images is not None):
            return {}  # nothing to write and nothing to measure
        ema.store(params)
        ema.copy_to(params)
        model.denoiser.eval()
        row: dict = {}
        try:
            n = max(cfg.eval_samples, cfg.grid_samples) if (feature and eval_images is not None) \
                else cfg.grid_samples
            imgs = generate(model, n, cfg.sample_steps, cfg.sample_eta, seed=cfg.seed + 12345, classes=y,
                            guidance_scale=cfg.sample_guidance)
            if run_dir is not None:
                from chaintune.utils.images import save_grid

                save_grid(imgs[: cfg.grid_samples], run_dir / "samples" / f"step_{step:06d}.png")
            if feature and eval_images is not None:
                from chaintune.metrics import fid_kid

                row = fid_kid(eval_images, imgs[: cfg.eval_samples], feature)
        finally:
            ema.restore(params)
            model.denoiser.train()
        return row

    bar = progress(range(start, cfg.steps), desc=f"transfer[{cfg.method}/{cfg.peft}]", disable=not show_progress,
                   total=cfg.steps, initial=start)
    t0 = time.time()
    for step in bar:
        idx = torch.randint(0, len(x0_all), (n_tgt,), generator=g)
        cond = target_conditions(model, y[idx], cfg.label_dropout, cfg.prompt, classes, g)
        b_x0 = None
        if n_bank:
            b_x0 = bank_x0[torch.randint(0, len(bank_x0), (n_bank,), generator=g).to(device)]
        parts = diff_tuning_loss(model, x0_all[idx].to(device), cond, b_x0, alpha=cfg.alpha, beta=cfg.beta,
                                 lam=cfg.lam, mode=cfg.timestep_mode, generator=g,
                                 psi=cfg.method == "diff-tuning")
        loss = parts.total
        if not torch.isfinite(loss):
            raise RuntimeError(f"loss became {loss.item()} at step {step}; lower --lr")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        sched.step()
        ema.step(params)
        done = step + 1
        row = None
        if done % cfg.log_every == 0 or done == cfg.steps:
            row = {"step": done, "loss": loss.item(), "recon": parts.recon.item(),
                   "retention": parts.retention.item(), "lr": sched.get_last_lr()[0],
                   "elapsed_s": round(time.time() - t0, 2)}
            bar.set_postfix(loss=f"{loss.item():.4f}")
        if cfg.eval_every and done % cfg.eval_every == 0 and done != cfg.steps:
            row = {**(row or {"step": done, "loss": loss.item()}), **evaluate(done)}
        if row is not None:
            history.append(row)
            if metrics_path is not None:
                _append_jsonl(metrics_path, row)
        if run_dir is not None and cfg.checkpoint_every and done % cfg.checkpoint_every == 0 and done != cfg.steps:
            from chaintune.training import checkpoint as ckpt

            ckpt.save(run_dir, done, model.denoiser, opt, sched, g, {}, keep=cfg.keep_checkpoints, ema=ema)

    final = evaluate(cfg.steps)
    ema.copy_to(params)
    model.denoiser.eval()
    final = {"step": cfg.steps, "loss": history[-1]["loss"] if history else float("nan"), **final,
             "final": True, "train_seconds": round(time.time() - t0, 2)}
    history.append(final)
    if run_dir is not None:
        from chaintune.training.runs import save_tuned_model, write_run_info

        _append_jsonl(metrics_path, final)
        save_tuned_model(run_dir, _folded(model), cfg.peft, cfg.lora_rank if cfg.peft == "lora" else None)
        info.update(status="done", final={k: v for k, v in final.items() if k != "final"},
                    bank=str(bank.path) if bank is not None else None, trainable_parameters=sum(
                        p.numel() for p in params), eval_data=eval_name, feature=feature)
        write_run_info(run_dir, info)
    return TransferResult(model, history, final, bank, trainable)


def _write_config(run_dir: Path, cfg: TransferConfig) -> None:
    import yaml

    from chaintune.utils.io import atomic_file

    with atomic_file(run_dir / "config.yaml") as f:
        yaml.safe_dump(asdict(cfg), f, sort_keys=False)
