"""Train a small pixel-space DDPM from scratch (how the built-in models are made).

Plain epsilon/v-prediction denoising loss with uniform timesteps, AdamW with warm-up and cosine
decay, and an EMA of the weights (the EMA weights are what is saved).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, UNet2DModel
from diffusers.optimization import get_cosine_schedule_with_warmup
from diffusers.training_utils import EMAModel

from chaintune.backends.unet import UNetModel
from chaintune.chain import add_noise, training_target
from chaintune.utils.progress import progress


@dataclass
class PretrainConfig:
    dataset: str = "digits:train"
    resolution: int = 8
    block_out_channels: list[int] = field(default_factory=lambda: [32, 64, 64])
    layers_per_block: int = 1
    attention: bool = True
    norm_num_groups: int = 16
    num_classes: int | None = None  # class-conditional when set (one extra null class is added)
    num_train_timesteps: int = 1000
    beta_schedule: str = "squaredcos_cap_v2"
    prediction_type: str = "epsilon"
    steps: int = 4000
    batch_size: int = 128
    lr: float = 3e-4
    warmup_steps: int = 200
    ema_decay: float = 0.999
    label_dropout: float = 0.1
    seed: int = 0


def build_unet(cfg: PretrainConfig) -> UNet2DModel:
    n = len(cfg.block_out_channels)
    down = ["DownBlock2D"] * n
    up = ["UpBlock2D"] * n
    if cfg.attention and n > 1:
        down[1], up[-2] = "AttnDownBlock2D", "AttnUpBlock2D"
    return UNet2DModel(
        sample_size=cfg.resolution,
        in_channels=1,
        out_channels=1,
        layers_per_block=cfg.layers_per_block,
        block_out_channels=tuple(cfg.block_out_channels),
        down_block_types=tuple(down),
        up_block_types=tuple(up),
        norm_num_groups=cfg.norm_num_groups,
        num_class_embeds=(cfg.num_classes + 1) if cfg.num_classes else None,
    )


def pretrain(cfg: PretrainConfig, out: str | Path | None = None, show_progress: bool = True) -> UNetModel:
    """Train a UNet2DModel DDPM on ``cfg.dataset``; save it (diffusers format) to ``out`` if given."""
    from chaintune.data import load_dataset
    from chaintune.utils.io import atomic_dir, save_json

    torch.manual_seed(cfg.seed)
    images, labels = load_dataset(cfg.dataset, size=cfg.resolution)
    x_all = images * 2 - 1
    unet = build_unet(cfg)
    sched = DDPMScheduler(
        num_train_timesteps=cfg.num_train_timesteps,
        beta_schedule=cfg.beta_schedule,
        prediction_type=cfg.prediction_type,
    )
    opt = torch.optim.AdamW(unet.parameters(), lr=cfg.lr, weight_decay=0.0)
    lr_sched = get_cosine_schedule_with_warmup(opt, cfg.warmup_steps, cfg.steps)
    ema = EMAModel(unet.parameters(), decay=cfg.ema_decay)
    g = torch.Generator().manual_seed(cfg.seed)
    bar = progress(range(cfg.steps), desc="pretrain", disable=not show_progress)
    for step in bar:
        idx = torch.randint(0, len(x_all), (cfg.batch_size,), generator=g)
        x0 = x_all[idx]
        noise = torch.randn(x0.shape, generator=g)
        t = torch.randint(0, cfg.num_train_timesteps, (cfg.batch_size,), generator=g)
        xt = add_noise(sched, x0, noise, t)
        cls = None
        if cfg.num_classes:
            cls = labels[idx].clone()
            drop = torch.rand(cfg.batch_size, generator=g) < cfg.label_dropout
            cls[drop] = cfg.num_classes
        loss = F.mse_loss(unet(xt, t, class_labels=cls).sample, training_target(sched, x0, noise, t))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        lr_sched.step()
        ema.step(unet.parameters())
        if step % 20 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
    ema.copy_to(unet.parameters())
    model = UNetModel(unet.eval(), sched, source="pretrain")
    if out is not None:
        with atomic_dir(out) as tmp:
            model.save(tmp)
            save_json(Path(tmp) / "chaintune_pretrain.json", cfg.__dict__)
    return model
