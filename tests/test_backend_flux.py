"""The FLUX.1 backend on a tiny offline FluxPipeline: the chain against diffusers' sampler (packed latents,
resolution-dependent shift, guidance embedding, true CFG), every estimator family, Diff-Tuning, the LoRA
format and the CLI."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from diffusers.pipelines.flux.pipeline_flux import calculate_shift

import chaintune
from chaintune.adapters import apply_lora
from chaintune.backends.flux import FluxModel, pack_latents, unpack_latents
from chaintune.chain import log_prob, prepare_scheduler, run_chain
from chaintune.rewards import FunctionReward
from chaintune.testing import tiny_flux_model
from chaintune.transfer import TransferConfig, transfer

BRIGHTNESS = FunctionReward(lambda images: images.mean(dim=(1, 2, 3)), differentiable=True, name="brightness")
PROMPTS = ["a red cube", "a blue ball"]


@pytest.fixture(scope="module")
def flux():
    return tiny_flux_model()


def _pipe_images(m: FluxModel, x_T: torch.Tensor, steps: int, **kw) -> torch.Tensor:
    return m.pipe(prompt=PROMPTS, num_inference_steps=steps, latents=pack_latents(x_T), output_type="pt",
                  max_sequence_length=m.max_sequence_length, height=m.height, width=m.width, **kw).images


def test_packing_and_schedule_are_the_pipelines(flux):
    x = torch.randn(2, *flux.latent_shape)
    _, h, w = flux.latent_shape
    packed = flux.pipe._pack_latents(x, 2, x.shape[1], h, w)
    assert torch.equal(pack_latents(x), packed) and torch.equal(unpack_latents(packed, h, w), x)
    assert torch.equal(flux.pipe._unpack_latents(packed, flux.height, flux.width, flux.pipe.vae_scale_factor), x)
    cfg = flux.scheduler.config
    mu = calculate_shift(h * w // 4, cfg.base_image_seq_len, cfg.max_image_seq_len, cfg.base_shift, cfg.max_shift)
    assert flux.scheduler.chain_mu == pytest.approx(mu) and cfg.use_dynamic_shifting
    ref = type(flux.pipe.scheduler).from_config(cfg)
    ref.set_timesteps(sigmas=np.linspace(1.0, 1 / 5, 5), mu=mu)  # what FluxPipeline.__call__ passes
    torch.testing.assert_close(prepare_scheduler(flux.scheduler, 5).sigmas, ref.sigmas, rtol=0, atol=0)
    flux.set_resolution(32, 16)  # the shift follows the resolution
    try:
        assert flux.latent_shape == (4, 16, 8) and flux.pixel_shape == (3, 32, 16)
        assert flux.scheduler.chain_mu > mu
    finally:
        flux.set_resolution(16, 16)


@pytest.mark.parametrize("scheduler", ["ddim", None])
def test_sampler_at_eta_zero_is_flux_pipeline(flux, scheduler):
    """Same initial latents, steps and guidance embedding: the pipeline's images to float precision."""
    tr = chaintune.sample(flux, 2, steps=4, eta=0.0, prompts=PROMPTS, guidance_scale=4.0, scheduler=scheduler,
                          generator=torch.Generator().manual_seed(0))
    ref = _pipe_images(flux, tr.latents[0], 4, guidance_scale=4.0)
    torch.testing.assert_close(tr.images, ref, rtol=1e-5, atol=1e-5)
    own = flux.pipe(prompt=PROMPTS, num_inference_steps=4, guidance_scale=4.0, output_type="pt", height=16, width=16,
                    max_sequence_length=flux.max_sequence_length, generator=torch.Generator().manual_seed(0)).images
    torch.testing.assert_close(tr.images, own, rtol=1e-5, atol=1e-5)  # initial_noise draws as the pipeline does


def test_true_cfg_is_the_pipelines(flux):
    flux.true_cfg_scale = 2.0
    try:
        tr = chaintune.sample(flux, 2, steps=3, eta=0.0, prompts=PROMPTS, guidance_scale=3.0,
                              generator=torch.Generator().manual_seed(1))
    finally:
        flux.true_cfg_scale = 1.0
    ref = _pipe_images(flux, tr.latents[0], 3, guidance_scale=3.0, true_cfg_scale=2.0, negative_prompt="")
    torch.testing.assert_close(tr.images, ref, rtol=1e-5, atol=1e-5)


def test_sde_log_probs_are_finite_and_recomputable(flux):
    fn = flux.denoise_fn(chaintune.sampling.make_conditions(flux, 2, prompts=PROMPTS))
    x_T = torch.randn(2, *flux.latent_shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        tr = run_chain(fn, flux.scheduler, x_T, num_steps=4, eta=0.7, generator=torch.Generator().manual_seed(1))
        assert tr.stochastic.all() and torch.isfinite(tr.log_probs).all()
        s = prepare_scheduler(flux.scheduler, 4)
        for i in (0, 3):
            lp = log_prob(fn, s, tr.latents[i], int(tr.timesteps[i]), tr.latents[i + 1], 0.7)
            torch.testing.assert_close(lp, tr.log_probs[:, i], rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("estimator,kw", [("rlr", {"h": 2, "sigma": 1e-2}), ("full-backprop", {}),
                                          ("reinforce", {}), ("grpo", {})])
def test_estimators_give_lora_gradients(estimator, kw):
    m = tiny_flux_model()
    apply_lora(m.denoiser, rank=2)
    prompts = [p for p in PROMPTS for _ in range(2)]  # GRPO's groups: samples of one prompt
    grads = chaintune.estimate_gradient(m, BRIGHTNESS, estimator, n=4, steps=3, eta=1.0, prompts=prompts,
                                        generator=torch.Generator().manual_seed(0), **kw)
    assert grads and all("lora_" in k for k in grads)
    assert all(torch.isfinite(g).all() for g in grads.values())
    assert sum(float(g.abs().sum()) for k, g in grads.items() if "lora_B" in k) > 0


def test_diff_tuning_run_loads_back_and_its_lora_loads_in_diffusers(tmp_path):
    base = tiny_flux_model()
    images = torch.rand(6, *base.pixel_shape)
    cfg = TransferConfig.from_dict(dict(
        method="diff-tuning", steps=3, batch_size=4, bank_share=0.4, bank_size=4, bank_steps=2, peft="lora",
        lr=1e-2, bank_dir=str(tmp_path / "banks"), eval_data=None, grid_samples=2, sample_steps=2, log_every=1))
    run = tmp_path / "run"
    res = transfer(cfg, model=tiny_flux_model(), target=(images, torch.zeros(6, dtype=torch.long)),
                   show_progress=False, out=run)
    assert all(math.isfinite(r["loss"]) for r in res.history) and res.bank is not None and len(res.bank) == 4
    assert res.bank.manifest["prompts"] == [""] and tuple(res.bank.latents.shape[1:]) == base.latent_shape
    tuned = chaintune.load(run)
    assert type(tuned) is FluxModel and tuned.source == str(run)
    tuned.max_sequence_length = base.max_sequence_length  # not saved by diffusers; the tiny models use 8
    tuned.set_resolution(base.height, base.width)
    # the adapter in diffusers' FLUX LoRA format loads with FluxPipeline.load_lora_weights
    plain = tiny_flux_model()
    plain.pipe.load_lora_weights(str(run / "adapter"))
    x, t, c = torch.randn(2, *base.latent_shape), torch.tensor([300, 700]), base.null_conditions(2)
    with torch.no_grad():
        torch.testing.assert_close(plain.model_output(x, t, c), tuned.model_output(x, t, c), rtol=1e-4, atol=1e-5)
        assert not torch.allclose(base.model_output(x, t, c), tuned.model_output(x, t, c))


def test_cli_samples_a_saved_flux_pipeline(tmp_path, capsys):
    from chaintune.cli import main as cli

    m = tiny_flux_model()
    m.save(tmp_path / "flux")
    loaded = chaintune.load(tmp_path / "flux")
    assert type(loaded) is FluxModel and loaded.kind == "flux"
    assert loaded.latent_shape == (4, 128, 128)  # FluxPipeline's default size: 128 * vae_scale_factor px
    try:
        cli.main(["sample", "--model", str(tmp_path / "flux"), "--num", "1", "--steps", "2", "--prompt", "a cat",
                  "--out", str(tmp_path / "samples"), "--device", "cpu"])
    except SystemExit as e:
        assert not e.code, capsys.readouterr().err
    assert (tmp_path / "samples" / "grid.png").exists()
