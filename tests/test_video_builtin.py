"""builtin:moving-digits and the pixel-space Wan path it runs on: parity with diffusers' WanPipeline, video
pretraining through the shared run skeleton (save -> load), the shipped model judged by the video judge, and
alignment of video raising a held-out judge."""

from __future__ import annotations

import json

import pytest
import torch

import chaintune
from chaintune.backends.wan import VIDEO_SHAPE_FILE, WanModel
from chaintune.data.moving import all_prompts, parse_prompt
from chaintune.errors import ChaintuneError
from chaintune.pretrain import build_wan_video, pretrain
from chaintune.pretrain.config import ArchConfig, PretrainConfig

TINY = dict(denoiser="wan", resolution=16, frames=4, num_layers=1, num_attention_heads=2, attention_head_dim=12,
            ffn_dim=16, patch_size=4, text_dim=16)
PROMPTS = ["a 7 moving left", "a 3 moving up slowly"]


@pytest.fixture(scope="module")
def pixel_wan():
    torch.manual_seed(0)
    pipe = build_wan_video(ArchConfig(**TINY), seed=0)
    for p in pipe.transformer.parameters():  # Wan zero-initialises nothing we rely on; make outputs non-trivial
        p.data.add_(0.02 * torch.randn_like(p))
    return WanModel(pipe, source="tiny-pixel-wan", max_sequence_length=24, num_frames=4, height=16, width=16,
                    default_prompts="builtin:moving-digits")


def test_pixel_space_shapes_and_decode_is_a_rescale(pixel_wan):
    m = pixel_wan
    assert m.pixel_space and m.produces_video
    assert m.latent_shape == (1, 4, 16, 16) and m.video_shape == (4, 1, 16, 16)
    x = torch.rand(2, 1, 4, 16, 16) * 2 - 1
    v = m.decode(x)
    assert v.shape == (2, 4, 1, 16, 16)
    torch.testing.assert_close(v, (x.permute(0, 2, 1, 3, 4) + 1) / 2)
    torch.testing.assert_close(m.encode_images(v), x)
    assert "vae" not in m.modules()


@pytest.mark.parametrize("guidance", [1.0, 2.5])
def test_pixel_sampler_at_eta_zero_is_wan_pipeline(pixel_wan, guidance):
    """chaintune's chain at eta = 0 = diffusers' WanPipeline (Euler scheduler) from the same initial pixels."""
    tr = chaintune.sample(pixel_wan, 2, steps=4, eta=0.0, prompts=PROMPTS, guidance_scale=guidance,
                          generator=torch.Generator().manual_seed(0))
    ref = pixel_wan.euler_pipeline()(prompt=PROMPTS, negative_prompt="", num_inference_steps=4,
                                     guidance_scale=guidance, latents=tr.latents[0], height=16, width=16,
                                     num_frames=4, max_sequence_length=24, output_type="latent").frames
    torch.testing.assert_close(tr.x0, ref, rtol=1e-5, atol=1e-5)


def test_pixel_wan_saves_and_loads_in_plain_diffusers(pixel_wan, tmp_path):
    from diffusers import WanPipeline

    pixel_wan.save(tmp_path / "m")
    index = json.loads((tmp_path / "m" / "model_index.json").read_text())
    assert index["vae"] == [None, None]
    assert json.loads((tmp_path / "m" / VIDEO_SHAPE_FILE).read_text())["default_prompts"] == "builtin:moving-digits"
    assert isinstance(WanPipeline.from_pretrained(str(tmp_path / "m"), vae=None), WanPipeline)
    back = chaintune.load(tmp_path / "m")
    assert back.pixel_space and back.video_shape == pixel_wan.video_shape
    x = torch.randn(1, *pixel_wan.latent_shape)
    enc = pixel_wan.encode_conditions(chaintune.Conditions(prompts=PROMPTS[:1]))
    enc2 = back.encode_conditions(chaintune.Conditions(prompts=PROMPTS[:1]))
    torch.testing.assert_close(pixel_wan._call(x, torch.tensor([500.0]), enc["cond"]),
                               back._call(x, torch.tensor([500.0]), enc2["cond"]))
    # --video-shape at load: a longer clip of the same model; an image model refuses it
    assert chaintune.load(tmp_path / "m", video_shape="6x16x16").video_shape == (6, 1, 16, 16)
    with pytest.raises(ChaintuneError, match="video models"):
        chaintune.load("builtin:digits", video_shape="6x16x16")


def test_video_pretraining_lowers_the_flow_loss_and_writes_a_loadable_model(tmp_path):
    cfg = PretrainConfig.from_dict(dict(TINY, dataset="moving-digits:train", steps=30, batch_size=8, lr=3e-3,
                                        warmup_steps=0, ema_decay=0.0, eval_samples=2, log_every=1, report=False,
                                        tensorboard=False))
    model = pretrain(cfg, out=tmp_path / "run", show_progress=False)
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5  # it learns (flow loss of noise ~ 2 at start)
    back = chaintune.load(tmp_path / "run")
    assert back.video_shape == (4, 1, 16, 16) and back.default_prompts == "builtin:moving-digits"
    assert sorted(p.name for p in (tmp_path / "run" / "samples").glob("*")) == ["step_000030.gif", "step_000030.png"]
    assert model.pixel_space


def test_pretrain_refuses_a_video_dataset_for_a_unet_and_the_reverse():
    with pytest.raises(ChaintuneError, match="denoiser wan"):
        PretrainConfig.from_dict({"dataset": "moving-digits:train"}).validate()
    with pytest.raises(ChaintuneError, match="denoiser wan"):
        PretrainConfig.from_dict({"denoiser": "wan", "dataset": "digits:train"}).validate()


def test_builtin_prompt_set_is_what_the_model_was_trained_on():
    from chaintune.prompts import load_prompts

    prompts = load_prompts("builtin:moving-digits").prompts
    assert prompts == all_prompts() and len(prompts) == 80
    assert {parse_prompt(p).digit for p in prompts} == set(range(10))


def _align_tiny(tmp_path, pixel_wan, name, **opts):
    from chaintune.align import AlignConfig, align, read_metrics

    if not (tmp_path / "m").exists():
        pixel_wan.save(tmp_path / "m")
    cfg = AlignConfig.from_dict(dict(dict(model=str(tmp_path / "m"), reward="moving-digit", steps=1, batch_size=8,
                                          sample_steps=3, eval_every=0, eval_samples=4, kl_weight=0.0,
                                          tensorboard=False, report=False, out=str(tmp_path / name)), **opts))
    run = align(cfg, overwrite=True, show_progress=False)
    return [m for m in read_metrics(run) if "grad_norm" in m]


def test_grpo_draws_groups_of_prompts_so_it_trains_on_a_model_with_many_prompts(pixel_wan, tmp_path):
    """80 prompts, batch 8: the default group of 4 samples per prompt gives a gradient; with one sample per prompt
    GRPO does as Flow-GRPO with num_image_per_prompt 1 (per-prompt statistics off: the batch z-score), so it trains
    too, where singleton groups alone would give advantage 0 and no gradient at all."""
    alone = _align_tiny(tmp_path, pixel_wan, "g1", estimator="grpo", group_size=1)
    grouped = _align_tiny(tmp_path, pixel_wan, "g4", estimator="grpo")
    assert alone[-1]["grad_norm"] > 0.0
    assert grouped[-1]["grad_norm"] > 0.0


def test_group_size_must_divide_the_batch():
    from chaintune.align import AlignConfig

    with pytest.raises(ChaintuneError, match="multiple of group_size"):
        AlignConfig.from_dict({"batch_size": 6, "group_size": 4}).validate()
    assert AlignConfig.from_dict({"estimator": "grpo"}).group_size == 4
    assert AlignConfig.from_dict({}).group_size == 1


def test_a_video_run_shows_strips_and_an_animated_preview_in_its_report(pixel_wan, tmp_path):
    from PIL import Image

    from chaintune.run.report import render_report

    _align_tiny(tmp_path, pixel_wan, "rep", estimator="rlr", eval_every=1, eval_samples=2, report=True)
    samples = tmp_path / "rep" / "samples"
    gifs = sorted(samples.glob("step_*.gif"))
    assert gifs and all(g.with_suffix(".png").exists() for g in gifs)
    with Image.open(gifs[-1]) as im:
        assert im.n_frames == pixel_wan.num_frames  # one animation frame per video frame
    strip = Image.open(gifs[-1].with_suffix(".png"))
    assert strip.width > 1.5 * strip.height  # 2 clips: 2 rows of 4 frames side by side
    html = render_report(tmp_path / "rep")
    assert html.count("data:image/gif;base64,") == len(gifs)


# ------------------------------------------------------------------------------------- the shipped model

def test_builtin_moving_digits_makes_moving_digits_that_follow_the_prompt():
    """Every one of the 80 prompts once, at the sampler settings of the demo (10 Euler steps, eta 0, the model's
    guidance 3), judged by the held-out judge (digit MLP on the centroid crops, ink-centroid motion). For scale:
    real clips of the same prompts score identity 0.89 / direction 1.0 (the crop costs the MLP some accuracy); an
    untrained model ~0.1 / ~0.25. The shipped model measured identity 0.64, direction 1.0, follows_prompt 0.69
    (mean of seeds 0 and 1); the bars leave room for noise across torch builds."""
    from chaintune.rewards.moving import judge_summary

    model = chaintune.load("builtin:moving-digits")
    assert model.pixel_space and model.video_shape == (8, 1, 16, 16)
    prompts = all_prompts()
    tr = chaintune.sample(model, len(prompts), steps=10, eta=0.0, prompts=prompts,
                          generator=torch.Generator().manual_seed(0))
    j = judge_summary(tr.images, prompts)
    assert j["identity"] >= 0.5 and j["direction"] >= 0.95 and j["follows_prompt"] >= 0.5, j
    assert j["speed_error"] < 0.15, j  # px/frame; the asked speeds are 0.5 and 1
    assert 0.5 < j["ink"] < 1.5, j  # digits, not blank or washed-out frames


def test_aligning_the_video_model_to_faster_motion_raises_the_heldout_motion_judge(tmp_path):
    """A target the demo does not use (``motion``: move faster the way the prompt says), full backprop, 6 steps of
    8 clips: the held-out twin (displacement by cross-correlation of the frames, never trained on) rises. Measured,
    seeds 0/1/2: reward +0.23/+0.25/+0.30 px/frame, held-out +0.076/+0.065/+0.075. Speed is bought with digit
    shape (identity 0.66-0.77 -> 0.45-0.48; the guard flagged nn-distance 1.34x the base in one seed)."""
    from chaintune.align import AlignConfig, align, read_metrics

    cfg = AlignConfig.from_dict(dict(model="builtin:moving-digits", reward="motion", estimator="full-backprop", lr=3e-4,
                                     steps=6, batch_size=8, sample_steps=10, eval_every=6, eval_samples=16,
                                     final_model="last", tensorboard=False, report=False, out=str(tmp_path / "run")))
    rows = [m for m in read_metrics(align(cfg, show_progress=False)) if "eval/heldout_reward" in m]
    before, after = rows[0], rows[-1]
    assert after["eval/reward"] > before["eval/reward"] + 0.05
    assert after["eval/heldout_reward"] > before["eval/heldout_reward"] + 0.02


def test_sample_without_a_prompt_uses_the_models_default_prompts(pixel_wan, tmp_path):
    """`chaintune sample` on a prompt model without --prompt samples its shipped prompts in order (as align trains
    on them), not the empty prompt: the PNGs equal a Python sample with those prompts, seed for seed."""
    import numpy as np
    from PIL import Image
    from typer.testing import CliRunner

    from chaintune.cli.main import app

    pixel_wan.save(tmp_path / "m")
    res = CliRunner().invoke(app, ["sample", "--model", str(tmp_path / "m"), "--num", "3", "--steps", "3",
                                   "--eta", "0", "--out", str(tmp_path / "s"), "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert "default prompts (builtin:moving-digits, 80)" in res.output
    model = chaintune.load(tmp_path / "m", device="cpu")
    want = chaintune.sample(model, 3, steps=3, eta=0.0, prompts=all_prompts()[:3], scheduler="ddim",
                            generator=torch.Generator().manual_seed(0)).images
    empty = chaintune.sample(model, 3, steps=3, eta=0.0, prompts="", scheduler="ddim",
                             generator=torch.Generator().manual_seed(0)).images
    from chaintune.utils.images import save_images

    save_images(want, tmp_path / "want")
    for i in range(3):
        got, ref = (np.asarray(Image.open(d / f"sample_{i:04d}.png")).astype(int) for d in (tmp_path / "s",
                                                                                              tmp_path / "want"))
        assert got.shape == ref.shape and np.abs(got - ref).max() <= 1, i
    assert not torch.allclose(want, empty)  # the prompt matters, so the check above could fail
