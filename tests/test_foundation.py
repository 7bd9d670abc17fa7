"""Issue-2 acceptance: the built-in model, the public API, backends, loading and the sample CLI."""

from __future__ import annotations

import pytest
import torch

import chaintune
from chaintune.backends import ModelNotFoundError
from chaintune.classifiers import load_classifier


def test_builtin_digits_samples_are_recognisable_digits():
    model = chaintune.load("builtin:digits")
    traj = chaintune.sample(model, 256, steps=50, eta=1.0, generator=torch.Generator().manual_seed(123))
    assert traj.images.shape == (256, 1, 8, 8)
    assert 0.0 <= float(traj.images.min()) and float(traj.images.max()) <= 1.0
    probs = load_classifier("digits-cnn")(traj.images).softmax(1)
    assert float(probs.max(1).values.mean()) >= 0.8
    assert set(probs.argmax(1).tolist()) == set(range(10))


def test_sample_returns_full_trajectory_and_is_reproducible():
    model = chaintune.load("builtin:digits")
    a = chaintune.sample(model, 4, steps=10, generator=torch.Generator().manual_seed(0))
    b = chaintune.sample(model, 4, steps=10, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(a.images, b.images)
    assert len(a.latents) == 11 and a.timesteps.shape == (10,) and a.log_probs.shape == (4, 10)
    assert torch.isfinite(a.log_probs[:, :-1]).all() and torch.isnan(a.log_probs[:, -1]).all()
    ddpm = chaintune.sample(model, 4, steps=10, scheduler="ddpm", generator=torch.Generator().manual_seed(0))
    assert ddpm.images.shape == (4, 1, 8, 8)


def test_tiny_sd_and_dit_sample_offline():
    from chaintune.testing import tiny_dit_model, tiny_sd_model

    sd = tiny_sd_model()
    tr = chaintune.sample(sd, 2, steps=3, prompts=["a red circle", "a cat"], guidance_scale=4.0,
                          generator=torch.Generator().manual_seed(0))
    assert tr.images.shape == (2, 3, 16, 16) and torch.isfinite(tr.log_probs).all()
    dit = tiny_dit_model()
    tr = chaintune.sample(dit, 2, steps=3, labels=[0, 3], guidance_scale=2.0,
                          generator=torch.Generator().manual_seed(0))
    assert tr.images.shape == (2, 3, 16, 16)


def test_saved_backends_reload_through_load(tmp_path):
    from chaintune.testing import tiny_dit_model, tiny_sd_model, tiny_unet_model

    for make in (tiny_unet_model, tiny_sd_model, tiny_dit_model):
        m = make()
        m.save(tmp_path / m.kind)
        again = chaintune.load(tmp_path / m.kind)
        assert type(again) is type(m)
        for (k, v), (_, w) in zip(m.denoiser.state_dict().items(), again.denoiser.state_dict().items(), strict=True):
            torch.testing.assert_close(v, w, msg=k)


def test_missing_models_give_clear_errors(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFoundError, match="not a local directory"):
        chaintune.load("someone/not-cached-model")
    with pytest.raises(ModelNotFoundError, match="did you mean builtin:digits"):
        chaintune.load("builtin:digit")


def test_sample_cli_writes_pngs_and_grid(tmp_path):
    from PIL import Image

    from chaintune.cli.main import main

    main(["sample", "--model", "builtin:digits", "--num", "5", "--steps", "5", "--out", str(tmp_path / "s")])
    files = sorted(p.name for p in (tmp_path / "s").glob("*.png"))
    assert files == ["grid.png"] + [f"sample_{i:04d}.png" for i in range(5)]
    assert Image.open(tmp_path / "s" / "sample_0000.png").size == (8, 8)
