"""Tiny randomly initialised diffusers components, built offline.

They exercise the exact code paths of Stable Diffusion, DiT and pixel UNets at toy size, so the
test-suite (and users without weights at hand) can run every backend with no download.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

from chaintune.backends.controlled import load_controlled
from chaintune.backends.dit import DiTModel
from chaintune.backends.flow import FlowModel
from chaintune.backends.flux import FluxModel
from chaintune.backends.sd import StableDiffusionModel
from chaintune.backends.sdxl import SDXLModel
from chaintune.backends.unet import UNetModel
from chaintune.backends.wan import WanModel
from chaintune.controlnet.trainer import sample_controlled
from chaintune.pretrain.objective import char_tokenizer
from chaintune.rewards import FramesReward, FunctionReward


def tiny_unet(sample_size: int = 8, num_class_embeds: int | None = None, seed: int = 0):
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    return UNet2DModel(
        sample_size=sample_size, in_channels=1, out_channels=1, layers_per_block=1,
        block_out_channels=(8, 16), down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4, num_class_embeds=num_class_embeds,
    )


def tiny_unet_model(sample_size: int = 8, num_class_embeds: int | None = None, seed: int = 0):
    from diffusers import DDPMScheduler

    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")
    return UNetModel(tiny_unet(sample_size, num_class_embeds, seed), sched, source="tiny-unet")


def _bytes_to_unicode() -> dict[int, str]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


def tiny_clip_tokenizer(max_length: int = 16):
    """A CLIPTokenizer over a byte-level vocabulary with no merges (every byte is a token)."""
    from transformers import CLIPTokenizer

    chars = list(_bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(chars)}
    for c in chars:
        vocab[c + "</w>"] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    d = Path(tempfile.mkdtemp(prefix="chaintune-tok-"))
    (d / "vocab.json").write_text(json.dumps(vocab))
    (d / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(d / "vocab.json"), str(d / "merges.txt"), model_max_length=max_length)


def tiny_vae(seed: int = 0, in_channels: int = 3, latent_channels: int = 4):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=in_channels, out_channels=in_channels, latent_channels=latent_channels,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4, sample_size=16,
    )


def tiny_sd_pipeline(seed: int = 0):
    """A StableDiffusionPipeline with ~100k parameters: 16 px images, 8 px latents."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tok = tiny_clip_tokenizer()
    torch.manual_seed(seed)
    text = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tok.get_vocab()), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, max_position_embeddings=tok.model_max_length,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    ))
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16,
        attention_head_dim=4, norm_num_groups=4,
    )
    sched = DDIMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                          beta_end=0.012, clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    return StableDiffusionPipeline(
        vae=tiny_vae(seed), text_encoder=text, tokenizer=tok, unet=unet, scheduler=sched,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def tiny_sd_model(seed: int = 0):
    return StableDiffusionModel(tiny_sd_pipeline(seed), source="tiny-sd")


def tiny_dit_model(seed: int = 0, num_classes: int = 4):
    from diffusers import DDIMScheduler, DiTTransformer2DModel

    torch.manual_seed(seed)
    dit = DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=1,
        sample_size=8, patch_size=2, norm_num_groups=4, num_embeds_ada_norm=num_classes,
    )
    sched = DDIMScheduler(num_train_timesteps=1000, clip_sample=False)
    return DiTModel(dit, tiny_vae(seed), sched, source="tiny-dit")


def _tiny_clip_with_projection(tok, seed: int, hidden: int = 8):
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    return CLIPTextModelWithProjection(CLIPTextConfig(
        vocab_size=len(tok.get_vocab()), hidden_size=hidden, intermediate_size=2 * hidden, projection_dim=hidden,
        num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=tok.model_max_length,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    ))


def tiny_flow_pipeline(seed: int = 0):
    """A StableDiffusion3Pipeline at toy size: two tiny CLIP encoders (no T5: diffusers then feeds
    zeros for the T5 tokens), a 1-layer SD3 transformer on 8 px latents, a tiny VAE with SD3's
    shift/scaling factors, and a shifted FlowMatchEulerDiscreteScheduler."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    tok, tok2 = tiny_clip_tokenizer(), tiny_clip_tokenizer()
    enc, enc2 = _tiny_clip_with_projection(tok, seed), _tiny_clip_with_projection(tok2, seed + 1)
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=1, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=32, caption_projection_dim=16, pooled_projection_dim=16, out_channels=4,
        pos_embed_max_size=8,
    )
    vae = tiny_vae(seed)
    vae.register_to_config(scaling_factor=1.5305, shift_factor=0.0609)
    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=sched, vae=vae, text_encoder=enc, tokenizer=tok,
        text_encoder_2=enc2, tokenizer_2=tok2, text_encoder_3=None, tokenizer_3=None,
    )


def tiny_flow_model(seed: int = 0):
    """A :class:`~chaintune.backends.flow.FlowModel` on :func:`tiny_flow_pipeline` (8 T5 slots)."""

    return FlowModel(tiny_flow_pipeline(seed), source="tiny-flow", max_sequence_length=8)


# the scheduler config SDXL base ships (Euler; its PNDM-era keys tell DDIM not to clip latents)
SDXL_SCHEDULER_CONFIG = {
    "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "clip_sample": False,
    "interpolation_type": "linear", "num_train_timesteps": 1000, "prediction_type": "epsilon", "sample_max_value": 1.0,
    "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "timestep_spacing": "leading",
    "trained_betas": None, "use_karras_sigmas": False,
}


def tiny_sdxl_pipeline(seed: int = 0):
    """A StableDiffusionXLPipeline at toy size: CLIP-L and CLIP-G stand-ins (8 hidden units each, the
    second with a projection for the pooled embedding), a "text_time" UNet on 8 px latents taking their
    concatenation (16) and 6 micro-conditioning ids, a tiny fp32-forced VAE, SDXL's Euler scheduler."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tok, tok2 = tiny_clip_tokenizer(), tiny_clip_tokenizer()
    torch.manual_seed(seed)
    text = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tok.get_vocab()), hidden_size=8, intermediate_size=16, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=tok.model_max_length,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    ))
    text2 = _tiny_clip_with_projection(tok2, seed + 1)
    torch.manual_seed(seed)
    time_dim = 4
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=16, attention_head_dim=(2, 4), use_linear_projection=True, norm_num_groups=4,
        addition_embed_type="text_time", addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=6 * time_dim + text2.config.projection_dim,
    )
    vae = tiny_vae(seed)
    vae.register_to_config(scaling_factor=0.13025, force_upcast=True)
    sched = EulerDiscreteScheduler.from_config(SDXL_SCHEDULER_CONFIG)
    return StableDiffusionXLPipeline(
        vae=vae, text_encoder=text, text_encoder_2=text2, tokenizer=tok, tokenizer_2=tok2, unet=unet,
        scheduler=sched, force_zeros_for_empty_prompt=True, add_watermarker=False,
    )


def tiny_sdxl_model(seed: int = 0):
    """A :class:`~chaintune.backends.sdxl.SDXLModel` on :func:`tiny_sdxl_pipeline`."""

    return SDXLModel(tiny_sdxl_pipeline(seed), source="tiny-sdxl")


def tiny_t5_tokenizer(max_length: int = 16):
    """A T5 (Unigram) tokenizer over printable ASCII, one token per character, built offline."""

    return char_tokenizer(max_length)


def tiny_wan_pipeline(seed: int = 0):
    """A WanPipeline at toy size: a 1-layer UMT5 encoder, a 1-block WanTransformer3DModel on 4-channel
    latents, a Wan VAE with Wan's compression (time 4, space 8: 5 frames of 16x16 px -> latents [4, 2, 2, 2])
    and non-trivial latents_mean/std, and Wan's UniPC flow scheduler (flow_shift 3)."""
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    tok = tiny_t5_tokenizer()
    torch.manual_seed(seed)
    text = UMT5EncoderModel(UMT5Config(
        vocab_size=len(tok), d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2,
        relative_attention_num_buckets=8, dropout_rate=0.0, pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id, decoder_start_token_id=tok.pad_token_id,
    )).eval()
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4,
        text_dim=16, freq_dim=32, ffn_dim=32, num_layers=1, rope_max_seq_len=32,
    )
    vae = AutoencoderKLWan(base_dim=3, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True], latents_mean=[0.1, -0.2, 0.3, 0.0],
                           latents_std=[1.5, 0.8, 1.2, 2.0])
    sched = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0,
                                    num_train_timesteps=1000)
    return WanPipeline(tokenizer=tok, text_encoder=text, vae=vae, scheduler=sched, transformer=transformer)


def tiny_wan_model(seed: int = 0):
    """A :class:`~chaintune.backends.wan.WanModel` on :func:`tiny_wan_pipeline`: 5 frames of 16x16 px, 8 tokens."""

    return WanModel(tiny_wan_pipeline(seed), source="tiny-wan", max_sequence_length=8, num_frames=5, height=16,
                    width=16)


def tiny_flux_pipeline(seed: int = 0):
    """A FluxPipeline at toy size: a tiny CLIP text encoder (pooled output) and a tiny T5 encoder (sequence; its
    tokenizer is the byte-level CLIP one, which FluxPipeline accepts), a guidance-distilled 1+1-layer FLUX
    transformer on 4-channel latents, a tiny VAE with FLUX's shift/scaling factors, and FLUX.1-dev's dynamically
    shifted FlowMatchEulerDiscreteScheduler."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    tok, tok2 = tiny_clip_tokenizer(), tiny_clip_tokenizer()
    torch.manual_seed(seed)
    clip = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tok.get_vocab()), hidden_size=8, intermediate_size=16, num_hidden_layers=1,
        num_attention_heads=2, max_position_embeddings=tok.model_max_length,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    ))
    t5 = T5EncoderModel(T5Config(
        vocab_size=len(tok2.get_vocab()), d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2,
        relative_attention_num_buckets=8, dropout_rate=0.0, pad_token_id=tok2.pad_token_id,
        eos_token_id=tok2.eos_token_id,
    ))
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=16, pooled_projection_dim=8, guidance_embeds=True, axes_dims_rope=(2, 2, 4),
    )
    vae = tiny_vae(seed, latent_channels=4)
    vae.register_to_config(scaling_factor=0.3611, shift_factor=0.1159)
    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True,
                                            base_image_seq_len=256, max_image_seq_len=4096, base_shift=0.5,
                                            max_shift=1.15)
    return FluxPipeline(scheduler=sched, vae=vae, text_encoder=clip, tokenizer=tok, text_encoder_2=t5,
                        tokenizer_2=tok2, transformer=transformer)


def tiny_flux_model(seed: int = 0):
    """A :class:`~chaintune.backends.flux.FluxModel` on :func:`tiny_flux_pipeline`: 16x16 px, 8 T5 tokens."""

    return FluxModel(tiny_flux_pipeline(seed), source="tiny-flux", max_sequence_length=8, height=16, width=16)


def assert_controlnet_run_matches_diffusers(run_dir, control, steps: int = 3, prompts=("a 3", "a 7"),
                                            guidance_scale: float = 3.0) -> None:
    """A ControlNet run over a tiny SD base (``chaintune controlnet`` or ``align --controlnet``): chaintune's sampler
    and diffusers' ``StableDiffusionControlNetPipeline`` on its ``model/`` give the same images from the same latents
    (DDIM, eta 0, CFG)."""
    from diffusers import StableDiffusionControlNetPipeline

    model = load_controlled(str(run_dir))
    n = len(control)
    x_T = torch.randn((n, *model.latent_shape), generator=torch.Generator().manual_seed(1))
    ours = sample_controlled(model, control, steps=steps, eta=0.0, prompts=list(prompts), guidance_scale=guidance_scale,
                             x_T=x_T)
    pipe = StableDiffusionControlNetPipeline.from_pretrained(str(Path(run_dir) / "model"), safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    h, w = model.pixel_shape[1:]
    theirs = pipe(list(prompts), image=control, height=h, width=w, num_inference_steps=steps,
                  guidance_scale=guidance_scale, eta=0.0, latents=x_T.clone(), output_type="pt").images
    torch.testing.assert_close(ours, theirs.float(), atol=1e-5, rtol=0)


# every backend's tiny model, for tests that must hold on each (compiled gradients, per-sample gathering)
TINY_MODELS = {"unet": tiny_unet_model, "sd": tiny_sd_model, "sdxl": tiny_sdxl_model, "sd3-flow": tiny_flow_model,
               "flux": tiny_flux_model, "dit": tiny_dit_model, "wan": tiny_wan_model}


def mean_reward(model):
    """A differentiable reward any tiny model's output can take: the mean pixel (per frame, averaged, for video)."""
    mean = FunctionReward(lambda images: images.float().mean(dim=tuple(range(1, images.dim()))), differentiable=True,
                          name="mean")
    return FramesReward(mean, "mean") if model.produces_video else mean
