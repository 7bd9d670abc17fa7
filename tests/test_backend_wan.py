"""The Wan 2.1 text-to-video backend on a tiny offline WanPipeline: parity with diffusers at eta = 0, every
estimator family with a video reward, Diff-Tuning on target videos, LoRA in diffusers' Wan format, sampling."""

from __future__ import annotations

import json
import math

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler

import chaintune
from chaintune.adapters import apply_lora
from chaintune.backends.wan import VIDEO_SHAPE_ENV, WanModel, flow_chain_scheduler
from chaintune.errors import ChaintuneError
from chaintune.rewards import FramesReward, FunctionReward, get_reward
from chaintune.sampling import chain_scheduler
from chaintune.testing import tiny_wan_model
from chaintune.transfer import TransferConfig, transfer

BRIGHTNESS = FunctionReward(lambda images: images.mean(dim=(1, 2, 3)), differentiable=True, name="brightness")
# a video reward: per-frame brightness (mean over frames) plus temporal consistency
VIDEO_REWARD = FramesReward(BRIGHTNESS, "mean") + get_reward("temporal-consistency")
PROMPTS = ["a red cube", "a blue ball"]


@pytest.fixture(scope="module")
def wan():
    return tiny_wan_model()


def test_chain_scheduler_is_euler_with_wans_flow_shift(wan):
    """Wan ships UniPC (flow_prediction, flow_shift); the chain runs FlowMatchEuler with the same shift."""
    assert isinstance(wan.pipe.scheduler, UniPCMultistepScheduler)
    for s in (wan.scheduler, chain_scheduler(wan, "ddim"), chain_scheduler(wan, "flow")):
        assert isinstance(s, FlowMatchEulerDiscreteScheduler)
        assert (s.config.shift, s.config.num_train_timesteps) == (3.0, 1000)
    euler = FlowMatchEulerDiscreteScheduler(shift=5.0)
    assert flow_chain_scheduler(euler) is euler
    with pytest.raises(ChaintuneError, match="flow-matching"):
        flow_chain_scheduler(UniPCMultistepScheduler())  # epsilon prediction: not a Wan scheduler


@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_sampler_at_eta_zero_is_wan_pipeline_with_the_same_euler_scheduler(wan, guidance):
    wan.negative_prompt = "blurry, static"
    try:
        tr = chaintune.sample(wan, 2, steps=4, eta=0.0, prompts=PROMPTS, guidance_scale=guidance,
                              generator=torch.Generator().manual_seed(0))
        kw = dict(prompt=PROMPTS, negative_prompt="blurry, static", num_inference_steps=4, guidance_scale=guidance,
                  latents=tr.latents[0], max_sequence_length=wan.max_sequence_length, height=16, width=16,
                  num_frames=5)
        ref = wan.euler_pipeline()(output_type="pt", **kw).frames
        ref_latents = wan.euler_pipeline()(output_type="latent", **kw).frames
    finally:
        wan.negative_prompt = ""
    assert tr.images.shape == ref.shape == (2, 5, 3, 16, 16)
    torch.testing.assert_close(tr.x0, ref_latents, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(tr.images, ref, rtol=1e-5, atol=1e-5)


def test_capabilities_shapes_and_sample(wan):
    assert (wan.takes_prompts, wan.takes_labels, wan.has_null_branch) == (True, False, True)
    assert (wan.produces_video, wan.decodes_latents) == (True, True)
    assert wan.latent_shape == (4, 2, 2, 2) and wan.pixel_shape == (3, 16, 16)
    assert wan.video_shape == (5, 3, 16, 16) and wan.num_frames == 5
    tr = chaintune.sample(wan, 3, steps=2, eta=1.0, prompts="a cat", guidance_scale=2.0, batch_size=2,
                          generator=torch.Generator().manual_seed(0))
    assert tr.images.shape == (3, 5, 3, 16, 16) and tr.x0.shape == (3, 4, 2, 2, 2)
    assert 0 <= float(tr.images.min()) and float(tr.images.max()) <= 1
    assert torch.isfinite(tr.log_probs).all()
    with torch.no_grad():
        z = wan.encode_images(tr.images)
        assert z.shape == tr.x0.shape
        assert wan.model_output(z, torch.tensor([10.0, 500.0, 900.0]), wan.null_conditions(3)).shape == z.shape
    with pytest.raises(ChaintuneError, match="videos"):
        wan.encode_images(torch.rand(2, 3, 16, 16))
    with pytest.raises(ChaintuneError, match="4k \\+ 1"):
        wan.set_video_shape(6, 16, 16)
    with pytest.raises(ChaintuneError, match="multiples of 16"):
        wan.set_video_shape(5, 24, 16)


@pytest.fixture(scope="module")
def wan_lora():
    m = tiny_wan_model()
    apply_lora(m.denoiser, rank=2)
    return m


@pytest.mark.parametrize("estimator,kw", [("rlr", {"h": 2, "sigma": 1e-2}), ("full-backprop", {}),
                                          ("reinforce", {})])
def test_estimators_give_lora_gradients_with_a_video_reward(wan_lora, estimator, kw):
    grads = chaintune.estimate_gradient(wan_lora, VIDEO_REWARD, estimator, n=2, steps=4, eta=1.0,
                                        generator=torch.Generator().manual_seed(0), prompts=PROMPTS,
                                        guidance_scale=3.0, **kw)
    assert grads and all("lora_" in k for k in grads)
    assert all(torch.isfinite(g).all() for g in grads.values())
    assert sum(float(g.abs().sum()) for k, g in grads.items() if "lora_B" in k) > 0


def test_lora_weights_load_with_wan_pipelines_own_loader(tmp_path):
    tuned = tiny_wan_model()
    apply_lora(tuned.denoiser, rank=2)
    with torch.no_grad():
        for n, p in tuned.denoiser.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    from chaintune.adapters import lora_state_dict

    assert tuned.save_lora_weights(tmp_path, lora_state_dict(tuned.denoiser)) is True
    plain, base = tiny_wan_model(), tiny_wan_model()
    plain.pipe.load_lora_weights(str(tmp_path))
    x, t, c = torch.randn(2, *tuned.latent_shape), torch.tensor([300.0, 700.0]), tuned.null_conditions(2)
    with torch.no_grad():
        torch.testing.assert_close(plain.model_output(x, t, c), tuned.model_output(x, t, c), rtol=1e-4, atol=1e-5)
        assert not torch.allclose(base.model_output(x, t, c), tuned.model_output(x, t, c))


def _flat_cfg(tmp_path, **kw) -> TransferConfig:
    flat = dict(method="diff-tuning", steps=3, batch_size=5, bank_share=0.4, bank_size=4, bank_steps=2,
                bank_dir=str(tmp_path / "banks"), eval_data=None, grid_samples=2, sample_steps=2, log_every=1,
                peft="lora", lr=1e-2, prompt="a video of {label}")
    return TransferConfig.from_dict({**flat, **kw})


def test_diff_tuning_on_target_videos(tmp_path, monkeypatch):
    """Target videos [n, F, C, H, W] go through transfer's data path (encode -> 5-D latents) unchanged; the bank
    holds videos and video latents. The evaluation grid (chaintune.utils.images.save_grid) takes images only:
    until it lays videos out as rows of frames, this test does that for it."""
    import chaintune.utils.images as images_mod

    videos, labels = torch.rand(6, 5, 3, 16, 16), torch.tensor([0, 1, 2, 0, 1, 2])
    res = transfer(_flat_cfg(tmp_path), model=tiny_wan_model(), target=(videos, labels), show_progress=False)
    assert len(res.history) == 3 and all(math.isfinite(r["loss"]) for r in res.history)
    assert res.bank.latents.shape == (4, 4, 2, 2, 2) and res.bank.images.shape == (4, 5, 3, 16, 16)
    assert res.bank.manifest["prompts"] == [""]

    save_grid = images_mod.save_grid

    def video_grid(images, path, nrow=None):
        if images.dim() == 5:  # one row per video, its frames left to right
            nrow, images = images.shape[1], images.flatten(0, 1)
        return save_grid(images, path, nrow)

    monkeypatch.setattr(images_mod, "save_grid", video_grid)
    run = tmp_path / "run"
    res = transfer(_flat_cfg(tmp_path), model=tiny_wan_model(), target=(videos, labels), show_progress=False, out=run)
    assert all(math.isfinite(r["loss"]) for r in res.history)
    tuned = chaintune.load(run)  # reloads at the size it was trained at (chaintune_video.json)
    assert isinstance(tuned, WanModel) and tuned.video_shape == (5, 3, 16, 16) and tuned.max_sequence_length == 8
    plain, base = tiny_wan_model(), tiny_wan_model()
    plain.pipe.load_lora_weights(str(run / "adapter"))  # diffusers' Wan LoRA format
    x, t, c = torch.randn(2, *base.latent_shape), torch.tensor([300.0, 700.0]), base.null_conditions(2)
    with torch.no_grad():
        torch.testing.assert_close(plain.model_output(x, t, c), tuned.model_output(x, t, c), rtol=1e-4, atol=1e-5)
        assert not torch.allclose(base.model_output(x, t, c), tuned.model_output(x, t, c))
    assert chaintune.sample(tuned, 2, steps=2, prompts="a cat").images.shape == (2, 5, 3, 16, 16)


def test_save_load_video_shape_and_vae_chunk(wan, tmp_path, monkeypatch):
    wan.save(tmp_path / "wan")
    index = json.loads((tmp_path / "wan" / "model_index.json").read_text())
    assert index["_class_name"] == "WanPipeline" and index["scheduler"][1] == "UniPCMultistepScheduler"
    loaded = chaintune.load(tmp_path / "wan", vae_chunk=1)
    assert isinstance(loaded, WanModel) and loaded.vae_chunk == 1 and loaded.video_shape == wan.video_shape
    kw = dict(steps=2, eta=0.5, prompts="a cat", guidance_scale=2.0)
    a = chaintune.sample(wan, 3, generator=torch.Generator().manual_seed(0), **kw).images
    b = chaintune.sample(loaded, 3, generator=torch.Generator().manual_seed(0), **kw).images
    torch.testing.assert_close(a, b)  # chunked decoding changes nothing but peak memory
    monkeypatch.setenv(VIDEO_SHAPE_ENV, "9x32x16")
    assert chaintune.load(tmp_path / "wan").latent_shape == (4, 3, 4, 2)
