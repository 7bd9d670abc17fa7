"""Train a small pixel-space diffusion model from scratch (how the built-in models are made).

Two architectures (``--denoiser``): a UNet2DModel DDPM on images (epsilon/v-prediction loss, uniform
timesteps), and a Wan text-to-video pipeline without a VAE (a WanTransformer3DModel on pixel clips with a
frozen, randomly initialised UMT5 prompt encoder; flow-matching velocity loss, uniform noise levels) — the
``builtin:moving-digits`` model. AdamW with warm-up and cosine decay and an EMA of the weights (the EMA
weights are what is saved); each is an objective over the shared run skeleton, so a pretrain run has the
same run directory, checkpoints and report as any.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from chaintune.backends.unet import UNetModel
from chaintune.backends.wan import WanModel
from chaintune.chain import add_noise, training_target
from chaintune.data import load_dataset
from chaintune.data.moving import all_prompts, moving_digits
from chaintune.errors import ChaintuneError
from chaintune.pretrain.config import ArchConfig, PretrainConfig
from chaintune.run.trainer import Evaluation, Objective, Trainer
from chaintune.sampling import sample

__all__ = ["PretrainConfig", "build_unet", "build_wan_video", "char_tokenizer", "check_unet_arch", "check_wan_arch",
           "pretrain"]


def check_unet_arch(arch: ArchConfig) -> None:
    """Refuse UNet options that cannot make a working UNet, naming the options (diffusers would fail later, inside
    a forward pass): each level halves the image, so the resolution must divide by 2 per downsampling, and
    GroupNorm splits every level's channels into --norm-num-groups groups."""
    levels = arch.block_out_channels
    if not levels or any(c < 1 for c in levels):
        raise ChaintuneError(f"--block-out-channels must give at least one level of >= 1 channels, got {levels}")
    step = 2 ** (len(levels) - 1)
    if arch.resolution % step:
        raise ChaintuneError(f"--resolution {arch.resolution} must be a multiple of {step}: the UNet halves the image "
                             f"at each of its {len(levels) - 1} downsamplings ({len(levels)} levels in "
                             "--block-out-channels)")
    bad = [c for c in levels if c % arch.norm_num_groups]
    if bad:
        raise ChaintuneError(f"--block-out-channels {bad[0]} is not divisible by --norm-num-groups "
                             f"{arch.norm_num_groups} (GroupNorm splits each level's channels into that many groups)")


def check_wan_arch(arch: ArchConfig) -> None:
    """Refuse Wan options the transformer cannot run with: frames are cut into patch_size x patch_size patches,
    and 3D RoPE splits each head's width in three even parts."""
    if arch.resolution % arch.patch_size:
        raise ChaintuneError(f"--resolution {arch.resolution} must be a multiple of --patch-size {arch.patch_size}")
    if arch.attention_head_dim % 6:
        raise ChaintuneError(f"--attention-head-dim {arch.attention_head_dim} must be a multiple of 6 (3D RoPE splits "
                             "it in three even parts)")


def build_unet(arch: ArchConfig):
    from diffusers import UNet2DModel

    check_unet_arch(arch)
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


def char_tokenizer(max_length: int = 24):
    """A T5 (Unigram) tokenizer over printable ASCII built offline, one token per character ("▁" + the first
    character of a word, like SentencePiece), with <pad>=0 and </s>=1 as T5/UMT5 have them. Short prompts over
    a small vocabulary need nothing bigger, and it keeps a shipped model a few MB."""
    from transformers import T5Tokenizer

    chars = [chr(i) for i in range(33, 127)]
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -1.0)]
    vocab += [(c, -2.0) for c in chars] + [("\u2581" + c, -1.5) for c in chars]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=max_length)


def build_wan_video(arch: ArchConfig, seed: int = 0):
    """A ``WanPipeline`` without a VAE (pixels are the latents): char tokenizer, a small UMT5 encoder with
    seeded random weights (frozen: a fixed injective text embedding the transformer learns to read), a
    WanTransformer3DModel on 1-channel frames, and Wan's UniPC flow scheduler."""
    from diffusers import UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    tok = char_tokenizer()
    torch.manual_seed(seed)
    text = UMT5EncoderModel(UMT5Config(
        vocab_size=len(tok), d_model=arch.text_dim, d_kv=arch.text_dim // 2, d_ff=2 * arch.text_dim,
        num_layers=arch.text_layers, num_heads=2, relative_attention_num_buckets=16, dropout_rate=0.0,
        pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, decoder_start_token_id=tok.pad_token_id)).eval()
    transformer = WanTransformer3DModel(
        patch_size=(1, arch.patch_size, arch.patch_size), num_attention_heads=arch.num_attention_heads,
        attention_head_dim=arch.attention_head_dim, in_channels=1, out_channels=1, text_dim=arch.text_dim,
        freq_dim=64, ffn_dim=arch.ffn_dim, num_layers=arch.num_layers, rope_max_seq_len=64)
    sched = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                    flow_shift=arch.flow_shift, num_train_timesteps=arch.num_train_timesteps)
    return WanPipeline(tokenizer=tok, text_encoder=text, vae=None, scheduler=sched, transformer=transformer)


class PretrainObjective(Objective):
    """The denoising loss on a dataset, from randomly initialised weights."""

    command = "pretrain"

    def __init__(self, cfg: PretrainConfig):
        self.cfg = cfg

    def prepare(self, run: Trainer) -> None:
        from diffusers import DDPMScheduler

        cfg, arch = self.cfg, self.cfg.arch
        check_unet_arch(arch)
        images, self.labels = load_dataset(cfg.dataset, size=arch.resolution)
        sched = DDPMScheduler(num_train_timesteps=arch.num_train_timesteps, beta_schedule=arch.beta_schedule,
                              prediction_type=arch.prediction_type)
        self.model = self.build_model(arch, sched).to(run.device)
        channels = self.model.pixel_shape[0]
        if images.shape[1] != channels:
            colour = {1: "greyscale", 3: "RGB"}.get(images.shape[1], f"{images.shape[1]}-channel")
            raise ChaintuneError(f"dataset {cfg.dataset} holds {colour} images and pretrain builds {channels}-channel "
                                 "models; convert the images to greyscale")
        self.x_all = (images * 2 - 1).to(run.device)

    def build_model(self, arch: ArchConfig, scheduler):
        """The model to train from scratch (a subclass swaps the architecture, e.g. a class-token UNet)."""
        return UNetModel(build_unet(arch), scheduler, source="pretrain")

    @property
    def null_label(self) -> int:
        """The label that stands for "no class" (classifier-free guidance dropout)."""
        return self.cfg.arch.num_classes

    def denoise_with(self, labels: torch.Tensor | None):
        """``(x_t, t) -> prediction`` of the trained denoiser for these labels."""
        return lambda x, t: self.model.denoiser(x, t, class_labels=labels).sample

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
                labels[torch.rand(n, generator=g) < cfg.label_dropout] = self.null_label
            denoise = self.denoise_with(None if labels is None else labels.to(x0.device))
            total += self.denoising_loss(run, x0, noise, t, denoise) / cfg.optim.grad_accum
        yield cfg.optim.grad_accum, {"loss": total}

    def denoising_loss(self, run: Trainer, x0, noise, t, denoise) -> float:
        """Backpropagate the denoising loss of ``denoise(x_t, t)`` (the scheduler's target) on one micro-batch."""
        xt = add_noise(self.model.scheduler, x0, noise, t)
        with run.autocast():
            out = denoise(xt, t)
        loss = F.mse_loss(out.float(), training_target(self.model.scheduler, x0, noise, t).float())
        loss.backward()
        return float(loss.detach())

    def evaluate(self, run: Trainer, step: int) -> Evaluation | None:
        n = self.cfg.eval.eval_samples
        tr = sample(self.model, n, steps=50, generator=torch.Generator().manual_seed(10_000 + self.cfg.run.seed))
        return Evaluation({}, tr.images)


class VideoPretrainObjective(PretrainObjective):
    """The flow-matching loss of a pixel-space Wan text-to-video model on procedural clips (moving digits)."""

    def prepare(self, run: Trainer) -> None:
        cfg, arch = self.cfg, self.cfg.arch
        self.split = cfg.dataset.partition(":")[2] or "train"
        if self.split not in ("train", "test", "all"):
            raise ChaintuneError(f"moving-digits splits are train, test, all; got {cfg.dataset!r}")
        check_wan_arch(arch)
        pipe = build_wan_video(arch, seed=cfg.run.seed)
        self.model = WanModel(pipe, source="pretrain", max_sequence_length=24, num_frames=arch.frames,
                              height=arch.resolution, width=arch.resolution,
                              default_prompts="builtin:moving-digits").to(run.device)
        # the text encoder is frozen: embed every training prompt (and the empty one, for guidance) once
        self.prompts = all_prompts()
        self.table = self.model._embed(self.prompts + [""])

    def updates(self, run: Trainer, step: int):
        cfg, g, arch = self.cfg, run.generator, self.cfg.arch
        n, total = cfg.optim.batch_size, 0.0
        for _ in range(cfg.optim.grad_accum):
            clips, prompts = moving_digits(n, self.split, arch.frames, arch.resolution, generator=g)
            x0 = (clips * 2 - 1).permute(0, 2, 1, 3, 4).to(run.device)  # [n, C, F, H, W] in [-1, 1]
            rows = torch.tensor([self.prompts.index(p) for p in prompts])
            rows[torch.rand(n, generator=g) < cfg.label_dropout] = len(self.prompts)  # the empty prompt
            noise = torch.randn(x0.shape, generator=g).to(x0)
            t = (torch.rand(n, generator=g) * arch.num_train_timesteps).to(x0.device)
            emb = self.table[rows.to(self.table.device)]
            total += self.denoising_loss(run, x0, noise, t, lambda x, s, emb=emb: self.model._call(x, s, emb)) \
                / cfg.optim.grad_accum
        yield cfg.optim.grad_accum, {"loss": total}

    def evaluate(self, run: Trainer, step: int) -> Evaluation | None:
        n = self.cfg.eval.eval_samples
        g = torch.Generator().manual_seed(10_000 + self.cfg.run.seed)
        prompts = [self.prompts[i] for i in torch.randint(len(self.prompts), (n,), generator=g).tolist()]
        tr = sample(self.model, n, steps=20, eta=0.0, prompts=prompts, guidance_scale=1.0, generator=g)
        return Evaluation({}, tr.images)


OBJECTIVES = {"unet": PretrainObjective, "wan": VideoPretrainObjective}
"""``--denoiser`` -> the pretraining objective that builds and trains it."""


def pretrain(cfg: PretrainConfig, out: str | Path | None = None, show_progress: bool = True, *,
             overwrite: bool = False, resume: bool = False, **trainer):
    """Train ``cfg.arch.denoiser`` from scratch on ``cfg.dataset``; with ``out``, write a run directory (a model id)."""
    obj = OBJECTIVES[cfg.arch.denoiser](cfg)
    Trainer(cfg, obj, out=out, overwrite=overwrite, resume=resume, show_progress=show_progress, **trainer).fit()
    return obj.model
