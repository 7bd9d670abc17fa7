"""The SDXL backend on a tiny offline StableDiffusionXLPipeline: sampler parity with diffusers, every
estimator family, Diff-Tuning with a bank, diffusers-format LoRA and the sample CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch
from diffusers import DDIMScheduler

import chaintune
from chaintune.adapters import apply_lora
from chaintune.backends.sdxl import SDXLModel
from chaintune.rewards import FunctionReward
from chaintune.testing import tiny_sdxl_model
from chaintune.transfer import TransferConfig, transfer
from chaintune.transfer.forgetting import analyze

BRIGHTNESS = FunctionReward(lambda images: images.mean(dim=(1, 2, 3)), differentiable=True, name="brightness")
PROMPTS = ["a red cube", "a blue ball"]


@pytest.mark.parametrize("zeros_for_empty", [True, False])
def test_sampler_at_eta_zero_is_the_diffusers_pipeline(zeros_for_empty):
    """Same initial latents, DDIM on the model's schedule, CFG: chaintune's chain == StableDiffusionXLPipeline
    (negative branch = zeros under force_zeros_for_empty_prompt, the encoded empty prompt otherwise)."""
    m = tiny_sdxl_model()
    m.pipe.register_to_config(force_zeros_for_empty_prompt=zeros_for_empty)
    tr = chaintune.sample(m, 2, steps=4, eta=0.0, prompts=PROMPTS, guidance_scale=3.0,
                          generator=torch.Generator().manual_seed(0))
    m.pipe.scheduler = DDIMScheduler.from_config(m.scheduler.config)
    m.pipe.set_progress_bar_config(disable=True)
    kw = dict(prompt=PROMPTS, num_inference_steps=4, guidance_scale=3.0, latents=tr.latents[0], eta=0.0)
    latents = m.pipe(**kw, output_type="latent").images
    images = m.pipe(**kw, output_type="pt").images
    torch.testing.assert_close(tr.x0, latents, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(tr.images, images, rtol=1e-5, atol=1e-5)


def test_capabilities_null_branch_and_fp32_vae():
    m = tiny_sdxl_model()
    assert (m.takes_labels, m.takes_prompts, m.null_label, m.has_null_branch) == (False, True, None, True)
    assert (m.decodes_latents, m.produces_video, tuple(m.pixel_shape)) == (True, False, (3, 16, 16))
    assert m.null_conditions(2).prompts == ["", ""] and m.scheduler.config.clip_sample is False
    x, t = torch.randn(2, *m.latent_shape), torch.tensor([10, 900])
    with torch.no_grad():  # the empty prompt is SDXL's zeroed unconditional branch, the one CFG uses
        enc = m.encode_conditions(m.null_conditions(2))
        assert not enc["cond"].any() and not enc["pooled"].any()
        assert m.model_output(m.encode_images(torch.rand(2, 3, 16, 16)), t, m.null_conditions(2)).shape == x.shape
        m.vae.to(torch.bfloat16).to(torch.float32)  # weights a half-precision VAE holds, in fp32
        full = m.decode(x)
        m.vae.to(torch.bfloat16)  # force_upcast: decoding goes back to fp32, even under autocast
        with torch.autocast("cpu", dtype=torch.bfloat16):
            again = m.decode(x)
    assert m.vae.dtype == torch.float32 and again.dtype == torch.float32
    torch.testing.assert_close(again, full, rtol=0, atol=0)


@pytest.fixture(scope="module")
def lora_sdxl():
    m = tiny_sdxl_model()
    apply_lora(m.denoiser, rank=2)
    return m


@pytest.mark.parametrize("estimator,kw", [("rlr", {"h": 2, "sigma": 1e-2}), ("full-backprop", {}),
                                          ("reinforce", {}), ("grpo", {})])
def test_estimator_gives_lora_gradients(lora_sdxl, estimator, kw):
    grads = chaintune.estimate_gradient(lora_sdxl, BRIGHTNESS, estimator, n=4, steps=3, eta=1.0,
                                        prompts=[p for p in PROMPTS for _ in range(2)], guidance_scale=3.0,
                                        generator=torch.Generator().manual_seed(0), **kw)
    assert grads and all("lora_" in k for k in grads)
    assert all(torch.isfinite(g).all() for g in grads.values())
    assert sum(float(g.abs().sum()) for k, g in grads.items() if "lora_B" in k) > 0


def test_diff_tuning_lora_run_loads_in_chaintune_and_diffusers(tmp_path):
    """Diff-Tuning with a bank, 3 LoRA steps; the run loads back as SDXL, its adapter loads into a plain
    StableDiffusionXLPipeline with the same UNet output, and the forgetting analysis scores it."""
    base = tiny_sdxl_model()
    images = torch.rand(6, *base.pixel_shape, generator=torch.Generator().manual_seed(0))
    cfg = TransferConfig.from_dict(dict(
        method="diff-tuning", steps=3, batch_size=5, bank_share=0.4, bank_size=4, bank_steps=2, peft="lora", lr=1e-2,
        bank_dir=str(tmp_path / "banks"), eval_data=None, grid_samples=2, sample_steps=2, log_every=1))
    run = tmp_path / "run"
    res = transfer(cfg, model=tiny_sdxl_model(), target=(images, torch.zeros(6, dtype=torch.long)),
                   show_progress=False, out=run)
    assert len(res.history) == 3 and all(math.isfinite(r["loss"]) for r in res.history), res.history
    assert res.bank is not None and len(res.bank) == 4 and res.bank.manifest["prompts"] == [""]

    tuned = chaintune.load(run)
    assert type(tuned) is SDXLModel and tuned.source == str(run)
    assert (run / "adapter" / "pytorch_lora_weights.safetensors").exists()
    plain = tiny_sdxl_model()
    plain.pipe.load_lora_weights(str(run / "adapter"))
    x, t = torch.randn(2, *base.latent_shape), torch.tensor([300, 700])
    with torch.no_grad():
        for c in (base.null_conditions(2), chaintune.sampling.make_conditions(base, 2, prompts=PROMPTS)):
            torch.testing.assert_close(plain.model_output(x, t, c), tuned.model_output(x, t, c), rtol=1e-4, atol=1e-5)
            assert not torch.allclose(base.model_output(x, t, c), tuned.model_output(x, t, c))
    result = analyze(base, tuned, images, res.bank.latents, num_timesteps=3, feature=None)
    curves = [*result["target"].values(), *result["bank"].values(), result["forgetting"], result["forgetting_x0"]]
    assert all(math.isfinite(v) for curve in curves for v in curve), result


def test_saved_pipeline_reloads_and_samples_from_the_cli(tmp_path):
    from PIL import Image

    from chaintune.cli.main import main

    m = tiny_sdxl_model()
    m.save(tmp_path / "sdxl")
    index = json.loads((tmp_path / "sdxl" / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline" and index["force_zeros_for_empty_prompt"] is True
    again = chaintune.load(tmp_path / "sdxl", vae_chunk=1)
    assert type(again) is SDXLModel and again.vae_chunk == 1
    kw = dict(steps=2, eta=0.5, prompts="a cat", guidance_scale=2.0)
    torch.testing.assert_close(chaintune.sample(again, 3, generator=torch.Generator().manual_seed(0), **kw).images,
                               chaintune.sample(m, 3, generator=torch.Generator().manual_seed(0), **kw).images)
    out = tmp_path / "samples"
    main(["sample", "--model", str(tmp_path / "sdxl"), "--num", "3", "--steps", "2", "--prompt", "a cat",
          "--guidance-scale", "2", "--device", "cpu", "--out", str(out)])
    assert sorted(p.name for p in out.glob("*.png")) == ["grid.png"] + [f"sample_{i:04d}.png" for i in range(3)]
    assert Image.open(out / "sample_0000.png").size == (16, 16)
