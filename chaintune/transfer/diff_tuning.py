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
import torch.nn.functional as F

from chaintune.backends.base import Conditions, DiffusionModel
from chaintune.chain import add_noise, training_target
from chaintune.data.registry import CLASS_RANGE
from chaintune.errors import ChaintuneError
from chaintune.transfer.bank import BankConfig, KnowledgeBank, build_bank
from chaintune.transfer.timesteps import importance_weights, sample_timesteps

__all__ = ["TransferConfig", "TransferResult", "LossParts", "transfer", "diff_tuning_loss", "load_target",
           "null_conditions", "default_eval_data", "METHODS", "TIMESTEP_MODES"]

METHODS = ("diff-tuning", "plain")
UNCONDITIONAL_RETENTION = (
    "Diff-Tuning's retention term trains the knowledge bank on the null branch of a conditional model; this model "
    "is unconditional, so bank and target share its only branch and retention pulls samples towards the source "
    "domain (README, 'Transfer'); in our benchmarks that helps only with 1-2 shots per class. Prefer a "
    "class-conditional base, or --method plain.")
TIMESTEP_MODES = ("sampling", "weighting")


@dataclass
class TransferConfig:
    """Everything a transfer run depends on (written to the run directory as its config)."""

    model: str = "builtin:glyphs"
    data: str = "digits-fewshot:10"
    method: str = "diff-tuning"
    peft: str = "none"
    lora_rank: int = 4
    steps: int = 1000
    batch_size: int = 32
    lr: float = 1e-4
    weight_decay: float = 0.0
    warmup_steps: int = 0
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    # Diff-Tuning (defaults as the official code)
    alpha: float = 1.0
    beta: float = 1.0
    lam: float = 0.1
    bank_share: float = 0.2
    timestep_mode: str = "sampling"
    # knowledge bank
    bank_size: int = 1000
    bank_steps: int = 50
    bank_eta: float = 1.0
    bank_scheduler: str = "ddim"
    bank_guidance: float | None = None
    bank_labels: str | list[int] = "random"
    bank_seed: int = 0
    bank_dir: str | None = None
    # conditioning of target images
    label_dropout: float = 0.1
    prompt: str = ""
    # evaluation and logging
    eval_data: str | None = "auto"
    feature: str = "auto"
    eval_every: int = 0
    eval_samples: int = 500
    sample_steps: int = 50
    sample_eta: float = 1.0
    sample_guidance: float | None = None  # CFG scale of evaluation samples (None: the model's default)
    grid_samples: int = 64
    log_every: int = 10
    checkpoint_every: int = 0
    keep_checkpoints: int = 2
    seed: int = 0
    device: str | None = None

    def validate(self) -> None:
        from chaintune.training.adapters import PEFT_METHODS

        if self.method not in METHODS:
            from chaintune.errors import unknown_name

            raise unknown_name("transfer method", self.method, METHODS)
        if self.peft not in PEFT_METHODS:
            from chaintune.errors import unknown_name

            raise unknown_name("peft method", self.peft, PEFT_METHODS)
        if self.timestep_mode not in TIMESTEP_MODES:
            from chaintune.errors import unknown_name

            raise unknown_name("timestep mode", self.timestep_mode, TIMESTEP_MODES)
        if self.steps < 1 or self.batch_size < 1:
            raise ChaintuneError("steps and batch_size must be >= 1")
        if not 0.0 <= self.bank_share < 1.0:
            raise ChaintuneError(f"bank_share must be in [0, 1), got {self.bank_share}")
        if self.lam < 0:
            raise ChaintuneError(f"lam must be >= 0, got {self.lam}")
        if self.retains() and self.bank_batch() == 0:
            raise ChaintuneError(f"batch_size {self.batch_size} with bank_share {self.bank_share} leaves no bank "
                                 "samples per batch; raise one of them (or set bank_share 0 for no retention)")

    def retains(self) -> bool:
        """Whether the retention term is on (Diff-Tuning with lam > 0 and bank_share > 0). Without it,
        Diff-Tuning is the psi timestep law on the target alone: no bank is built or trained on."""
        return self.method == "diff-tuning" and self.lam > 0 and self.bank_share > 0

    def bank_batch(self) -> int:
        """Bank samples per batch (0 without retention); at least one target sample remains."""
        if not self.retains():
            return 0
        return min(self.batch_size - 1, int(round(self.batch_size * self.bank_share)))

    def bank_config(self) -> BankConfig:
        labels = self.bank_labels
        if isinstance(labels, str) and labels not in ("random", "null"):
            try:
                labels = [int(x) for x in labels.split(",")]
            except ValueError:
                msg = f"bank labels must be random, null or class ids like 0,1,2; got {labels!r}"
                raise ChaintuneError(msg) from None
        return BankConfig(size=self.bank_size, steps=self.bank_steps, eta=self.bank_eta,
                          scheduler=self.bank_scheduler, guidance_scale=self.bank_guidance, labels=labels,
                          seed=self.bank_seed)

    @classmethod
    def from_dict(cls, values: dict) -> TransferConfig:
        from chaintune.utils.io import strict_config

        return strict_config(cls, values, "transfer option")

    @classmethod
    def from_run(cls, run_dir: str | Path) -> TransferConfig | None:
        """The config a ``transfer`` run directory was made with (its ``config.yaml``), or None."""
        import yaml

        path = Path(run_dir) / "config.yaml"
        if not path.is_file():
            return None
        values = yaml.safe_load(path.read_text()) or {}
        return cls.from_dict(values) if isinstance(values, dict) else None


@dataclass
class LossParts:
    total: torch.Tensor
    recon: torch.Tensor
    retention: torch.Tensor
    t_target: torch.Tensor
    t_bank: torch.Tensor | None


@dataclass
class TransferResult:
    model: DiffusionModel
    history: list[dict] = field(default_factory=list)
    final: dict = field(default_factory=dict)
    bank: KnowledgeBank | None = None
    trainable: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------- conditioning helpers


def null_conditions(model: DiffusionModel, n: int) -> Conditions:
    """The unconditional branch for ``n`` samples: null label / empty prompt / nothing."""
    if model.kind == "sd":
        return Conditions(prompts=[""] * n)
    return Conditions()  # UNet and DiT backends fill in their null class when labels is None


def _null_label(model: DiffusionModel) -> int | None:
    if model.kind == "dit":
        return model.num_classes
    return getattr(model, "null_label", None)


def target_conditions(model: DiffusionModel, labels: torch.Tensor, cfg: TransferConfig,
                      classes: list[str] | None, g: torch.Generator) -> Conditions:
    """Conditions for target images; with prob ``label_dropout`` a label/prompt becomes null (keeps CFG working)."""
    n = len(labels)
    drop = torch.rand(n, generator=g) < cfg.label_dropout
    if model.kind == "sd":
        names = [classes[i] if classes and i < len(classes) else str(i) for i in labels.tolist()]
        prompts = [("" if d else cfg.prompt.replace("{label}", name)) for name, d in zip(names, drop.tolist(),
                                                                                        strict=True)]
        return Conditions(prompts=prompts)
    if not model.conditional:
        return Conditions()
    null = _null_label(model)
    lab = labels.clone()
    if null is not None:
        lab[drop] = null
    return Conditions(labels=lab)


# --------------------------------------------------------------------------- the objective


def _per_sample_loss(model: DiffusionModel, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor,
                     cond: Conditions) -> torch.Tensor:
    sched = model.scheduler
    x_t = add_noise(sched, x0, noise, t)
    out = model.model_output(x_t, t, cond)
    target = training_target(sched, x0, noise, t)
    return F.mse_loss(out.float(), target.float(), reduction="none").flatten(1).mean(1)


def diff_tuning_loss(model: DiffusionModel, target_x0: torch.Tensor, target_cond: Conditions,
                     bank_x0: torch.Tensor | None, *, alpha: float = 1.0, beta: float = 1.0, lam: float = 0.1,
                     mode: str = "sampling", generator: torch.Generator | None = None,
                     t_target: torch.Tensor | None = None, t_bank: torch.Tensor | None = None,
                     noise_target: torch.Tensor | None = None,
                     noise_bank: torch.Tensor | None = None, psi: bool | None = None) -> LossParts:
    """L = mean(recon on target, t ~ psi) + lam * mean(retention on bank, t ~ xi).

    ``bank_x0=None`` drops the retention term; the target's t is then uniform (plain fine-tuning)
    unless ``psi=True`` (Diff-Tuning without a bank). In ``weighting`` mode t is uniform and each
    per-sample loss is multiplied by T p(t). Timesteps and noises may be passed in (tests
    recompute the loss from them).
    """
    T = int(model.scheduler.config.num_train_timesteps)
    dev = target_x0.device
    psi = bank_x0 is not None if psi is None else psi
    if t_target is None:
        kind = "psi" if psi and mode == "sampling" else "uniform"
        t_target = sample_timesteps(len(target_x0), T, kind, alpha, generator)
    t_target = t_target.to(dev)
    if noise_target is None:
        noise_target = torch.randn(target_x0.shape, generator=generator).to(target_x0)
    ret = None
    if bank_x0 is None:
        rec = _per_sample_loss(model, target_x0, t_target, noise_target, target_cond)
    else:
        if t_bank is None:
            kind = "uniform" if mode == "weighting" else "xi"
            t_bank = sample_timesteps(len(bank_x0), T, kind, beta, generator)
        t_bank = t_bank.to(dev)
        if noise_bank is None:
            noise_bank = torch.randn(bank_x0.shape, generator=generator).to(bank_x0)
        joint = _joint_conditions(model, target_cond, len(target_x0), len(bank_x0))
        if joint is not None:  # one forward pass for target and bank (same maths, less overhead)
            both = _per_sample_loss(model, torch.cat([target_x0, bank_x0]), torch.cat([t_target, t_bank]),
                                    torch.cat([noise_target, noise_bank]), joint)
            rec, ret = both[: len(target_x0)], both[len(target_x0):]
        else:
            rec = _per_sample_loss(model, target_x0, t_target, noise_target, target_cond)
            ret = _per_sample_loss(model, bank_x0, t_bank, noise_bank, null_conditions(model, len(bank_x0)))
        if mode == "weighting":
            ret = ret * importance_weights(t_bank, T, "xi", beta)
    if psi and mode == "weighting":  # one rule for the target, with or without a bank
        rec = rec * importance_weights(t_target, T, "psi", alpha)
    recon = rec.mean()
    if ret is None:
        return LossParts(recon, recon, recon.new_zeros(()), t_target, None)
    retention = ret.mean()
    return LossParts(recon + lam * retention, recon, retention, t_target, t_bank)


def _joint_conditions(model: DiffusionModel, target: Conditions, n_target: int, n_bank: int) -> Conditions | None:
    """Target conditions followed by the null conditions of the bank, as one batch (None: not possible)."""
    if target.extra:
        return None
    if model.kind == "sd":
        prompts = list(target.prompts) if target.prompts is not None else [""] * n_target
        return Conditions(prompts=prompts + [""] * n_bank)
    if model.kind not in ("unet", "dit"):
        return None
    if target.labels is None:
        return Conditions()  # unconditional, or null labels throughout
    null = _null_label(model)
    null = 0 if null is None else null  # the UNet backend's own fallback for a model without a null class
    return Conditions(labels=torch.cat([target.labels, torch.full((n_bank,), null, dtype=torch.long)]))


# --------------------------------------------------------------------------- data


def pixel_spec(model: DiffusionModel) -> tuple[int, int]:
    """(channels, size) of the images a model is trained on (pixels, before any VAE)."""
    c, h, _ = model.latent_shape
    vae = getattr(model, "vae", None)
    if vae is None:
        return c, h
    return int(vae.config.in_channels), h * 2 ** (len(vae.config.block_out_channels) - 1)


def _match_channels(x: torch.Tensor, c: int) -> torch.Tensor:
    if x.shape[1] == c:
        return x
    if x.shape[1] == 1:
        return x.repeat(1, c, 1, 1)
    if c == 1:
        return x.mean(1, keepdim=True)
    raise ChaintuneError(f"cannot convert {x.shape[1]}-channel images to {c} channels")


def load_target(model: DiffusionModel, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Dataset ``name`` as images at the model's pixel size/channels, [0, 1]."""
    from chaintune.data import load_dataset

    c, size = pixel_spec(model)
    try:
        x, y = load_dataset(name, size=size)
    except ChaintuneError:
        raise
    except (ValueError, FileNotFoundError) as e:
        raise ChaintuneError(f"dataset {name!r}: {e}") from e
    return _match_channels(x.float(), c), y


@torch.no_grad()
def encode(model: DiffusionModel, images: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """Images in [0, 1] -> the denoiser's training space (pixels in [-1, 1] or VAE latents), once."""
    parts = [model.encode_images(images[i : i + batch_size].to(model.device, model.dtype))
             for i in range(0, len(images), batch_size)]
    return torch.cat(parts).float()


def default_eval_data(data: str) -> str | None:
    """Held-out images for FID: the test split of a built-in dataset, nothing for a folder."""
    base = data.partition(":")[0]
    if base in ("digits", "digits-fewshot"):
        return "digits:test"
    m = CLASS_RANGE.match(base)
    if m:  # digits-AtoB / digits-fewshot-AtoB: the test split of the same classes
        return f"digits-{m.group(2)}to{m.group(3)}:test"
    if base == "glyphs":
        return "glyphs:test"
    return None


def default_feature(data: str) -> str | None:
    import os

    from chaintune.metrics import INCEPTION_ENV

    base = data.partition(":")[0]
    if base in ("digits", "digits-fewshot", "glyphs") or CLASS_RANGE.match(base):
        return "digits-cnn"
    if os.environ.get(INCEPTION_ENV):
        return "inception"
    return None


# --------------------------------------------------------------------------- evaluation


def draw_labels(model: DiffusionModel, classes: torch.Tensor | None, n: int,
                generator: torch.Generator) -> torch.Tensor | None:
    """``n`` labels drawn with repetition from ``classes`` (so at their frequencies); None unless the
    model takes class labels and ``classes`` is non-empty."""
    if classes is None or not len(classes) or not model.class_conditional:
        return None
    return classes.long()[torch.randint(0, len(classes), (n,), generator=generator)]


@torch.no_grad()
def generate(model: DiffusionModel, n: int, steps: int, eta: float, seed: int, batch_size: int = 250, *,
             classes: torch.Tensor | None = None, guidance_scale: float | None = None,
             with_labels: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor | None]:
    """``n`` samples (images in [0, 1], CPU) with a fixed seed, so evaluations are comparable.

    ``classes``: for a class-conditional model, labels are drawn from these (with repetition, so
    passing the target's labels reproduces its class frequencies); default: all of the model's classes.
    ``with_labels``: also return the label each sample was drawn for (None: unconditional).
    """
    from chaintune.sampling import sample

    g = torch.Generator().manual_seed(seed)
    labels = draw_labels(model, classes, n, g)
    traj = sample(model, n, steps=steps, eta=eta, generator=g, batch_size=batch_size, labels=labels,
                  guidance_scale=guidance_scale)
    images = traj.images.float().cpu()
    if not with_labels:
        return images
    used = traj.conditions.get("labels") if traj.conditions else None
    return images, None if used is None else used.cpu()


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
        cond = target_conditions(model, y[idx], cfg, classes, g)
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
