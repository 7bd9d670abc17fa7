"""Train a small pixel-space DDPM from scratch (how the built-in models are made).

Plain epsilon/v-prediction denoising loss with uniform timesteps, AdamW with warm-up and cosine
decay, and an EMA of the weights (the EMA weights are what is saved) — an objective over the
shared run skeleton, so a pretrain run has the same run directory, checkpoints and report as any.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from chaintune.backends.unet import UNetModel
from chaintune.chain import add_noise, training_target
from chaintune.training.config import ArchConfig, PretrainConfig
from chaintune.training.trainer import Evaluation, Objective, Trainer

__all__ = ["PretrainConfig", "build_unet", "pretrain"]


def build_unet(arch: ArchConfig):
    from diffusers import UNet2DModel

    n = len(arch.block_out_channels)
    down = ["DownBlock2D"] * n
    up = ["UpBlock2D"] * n
    if arch.attention and n > 1:
        down[1], up[-2] = "AttnDownBlock2D", "AttnUpBlock2D"
    return UNet2DModel(
        sample_size=arch.resolution,
        in_channels=1,
        out_channels=1,
        layers_per_block=arch.layers_per_block,
        block_out_channels=tuple(arch.block_out_channels),
        down_block_types=tuple(down),
        up_block_types=tuple(up),
        norm_num_groups=arch.norm_num_groups,
        num_class_embeds=(arch.num_classes + 1) if arch.num_classes else None,
    )


class PretrainObjective(Objective):
    """The denoising loss on a dataset, from randomly initialised weights."""

    command = "pretrain"

    def __init__(self, cfg: PretrainConfig):
        self.cfg = cfg

    def prepare(self, run: Trainer) -> None:
        from diffusers import DDPMScheduler

        from chaintune.data import load_dataset

        cfg, arch = self.cfg, self.cfg.arch
        images, self.labels = load_dataset(cfg.dataset, size=arch.resolution)
        self.x_all = (images * 2 - 1).to(run.device)
        sched = DDPMScheduler(num_train_timesteps=arch.num_train_timesteps, beta_schedule=arch.beta_schedule,
                              prediction_type=arch.prediction_type)
        self.model = UNetModel(build_unet(arch).to(run.device), sched, source="pretrain")

    def updates(self, run: Trainer, step: int):
        cfg, g, arch = self.cfg, run.generator, self.cfg.arch
        n, total = cfg.optim.batch_size, 0.0
        for _ in range(cfg.optim.grad_accum):
            idx = torch.randint(0, len(self.x_all), (n,), generator=g)
            x0 = self.x_all[idx.to(self.x_all.device)]
            noise = torch.randn(x0.shape, generator=g).to(x0)
            t = torch.randint(0, arch.num_train_timesteps, (n,), generator=g).to(x0.device)
            labels = None
            if arch.num_classes:
                labels = self.labels[idx].clone()
                labels[torch.rand(n, generator=g) < cfg.label_dropout] = arch.num_classes  # the null class
            xt = add_noise(self.model.scheduler, x0, noise, t)
            with run.autocast():
                out = self.model.denoiser(xt, t, class_labels=None if labels is None else labels.to(x0.device)).sample
            loss = F.mse_loss(out.float(), training_target(self.model.scheduler, x0, noise, t).float())
            loss.backward()
            total += float(loss.detach()) / cfg.optim.grad_accum
        yield cfg.optim.grad_accum, {"loss": total}

    def evaluate(self, run: Trainer, step: int) -> Evaluation | None:
        from chaintune.sampling import sample

        n = self.cfg.eval.eval_samples
        tr = sample(self.model, n, steps=50, generator=torch.Generator().manual_seed(10_000 + self.cfg.run.seed))
        return Evaluation({}, tr.images)


def pretrain(cfg: PretrainConfig, out: str | Path | None = None, show_progress: bool = True, *,
             overwrite: bool = False, resume: bool = False, **trainer) -> UNetModel:
    """Train a UNet2DModel DDPM on ``cfg.dataset``; with ``out``, write a run directory (a model id)."""
    obj = PretrainObjective(cfg)
    Trainer(cfg, obj, out=out, overwrite=overwrite, resume=resume, show_progress=show_progress, **trainer).fit()
    return obj.model
