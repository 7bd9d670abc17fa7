"""ControlNet training with Diff-Tuning's timestep law (chaintune.controlnet): no-op start, psi law, diffusers
pipeline round trip, condition extractors, CLI end to end."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from chaintune.backends.base import Conditions
from chaintune.errors import ChaintuneError

FAST = {"tensorboard": False, "report": False, "progress": False, "save_every": 0}


def tiny_pixel_model(seed: int = 0):
    from diffusers import DDPMScheduler

    from chaintune.backends.pixel_cond import PixelCondModel, build_cond_unet
    from chaintune.pretrain.config import ArchConfig

    torch.manual_seed(seed)
    unet = build_cond_unet(ArchConfig(resolution=16, block_out_channels=[8, 16], num_classes=10, norm_num_groups=4))
    return PixelCondModel(unet, DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2"))


def _digits(n: int, channels: int = 1):
    from chaintune.data import digits_split

    x, y = digits_split("train", 16)
    return x[:n].repeat(1, channels, 1, 1), y[:n]


# ------------------------------------------------------------------------------------- no-op start


@pytest.mark.parametrize("which", ["pixel", "sd", "sdxl"])
def test_new_controlnet_is_an_exact_noop(which):
    from chaintune.backends.controlled import ControlledModel, new_controlnet
    from chaintune.controlnet.trainer import control_images
    from chaintune.testing import tiny_sd_model, tiny_sdxl_model

    base = {"pixel": tiny_pixel_model, "sd": tiny_sd_model, "sdxl": tiny_sdxl_model}[which]()
    model = ControlledModel(base, new_controlnet(base), "edges")
    x0, y = _digits(3, base.pixel_shape[0])
    cond = Conditions(labels=y) if base.takes_labels else Conditions(prompts=["a 1", "a 2", ""])
    ctrl = Conditions(labels=cond.labels, prompts=cond.prompts,
                      control=control_images(model, "edges", x0))
    g = torch.Generator().manual_seed(0)
    x = torch.randn((3, *base.latent_shape), generator=g)
    t = torch.tensor([10, 500, 990])
    with torch.no_grad():
        ref, out = base.model_output(x, t, cond), model.model_output(x, t, ctrl)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=0)
    # and it is not a no-op by accident: the residuals reach the UNet once the zero convolutions move
    with torch.no_grad():
        for p in model.denoiser.controlnet_down_blocks.parameters():
            p.add_(0.1)
        assert (model.model_output(x, t, ctrl) - ref).abs().max() > 1e-3


def test_pixel_base_takes_control_at_full_resolution():
    from chaintune.backends.controlled import conditioning_embedding_channels, new_controlnet
    from chaintune.testing import tiny_sd_model

    base = tiny_pixel_model()
    assert conditioning_embedding_channels(base) == (16,)  # no stride-2 stage: 16x16 control for 16x16 pixels
    assert new_controlnet(base).config.conditioning_channels == 1
    assert conditioning_embedding_channels(tiny_sd_model()) == (16, 32)  # tiny VAE: x2


def test_controlnet_needs_a_unet2dcondition_base(tiny_unet_model):
    from chaintune.backends.controlled import new_controlnet

    with pytest.raises(ChaintuneError, match="UNet2DConditionModel"):
        new_controlnet(tiny_unet_model)


# ------------------------------------------------------------------------------------- timestep law


def test_config_picks_the_law_from_the_method():
    from chaintune.controlnet.config import ControlNetConfig

    assert ControlNetConfig().law() == "psi"
    assert ControlNetConfig.from_dict({"method": "plain"}).law() == "uniform"
    assert ControlNetConfig.from_dict({"timestep_law": "uniform"}).law() == "uniform"
    with pytest.raises(ChaintuneError, match="uniform"):
        ControlNetConfig.from_dict({"method": "plain", "timestep_law": "psi"}).validate()


@pytest.mark.parametrize("law,alpha", [("psi", 1.0), ("psi", 2.0), ("uniform", 1.0)])
def test_training_timesteps_follow_the_law(monkeypatch, law, alpha):
    """The t the objective trains on, histogrammed over 40k draws, match chaintune.transfer.timesteps' P(t)."""
    import chaintune.controlnet.trainer as trainer_mod
    from chaintune.controlnet.config import ControlNetConfig
    from chaintune.controlnet.trainer import ControlNetObjective
    from chaintune.transfer.timesteps import timestep_probs

    seen: list[torch.Tensor] = []

    def record(scheduler, x0, noise, t):
        seen.append(t.clone())
        return x0

    monkeypatch.setattr(trainer_mod, "add_noise", record)
    cfg = ControlNetConfig.from_dict({"timestep_law": law, "alpha": alpha, "batch_size": 8000})
    obj = ControlNetObjective(cfg)
    obj.model = _Recorder(tiny_pixel_model())
    obj.x0_all, obj.y = torch.zeros(4, 1, 2, 2), torch.zeros(4, dtype=torch.long)
    obj.control_all = torch.zeros(4, 1, 2, 2)

    class Run:
        generator = torch.Generator().manual_seed(0)
        device = torch.device("cpu")

        @staticmethod
        def autocast():
            import contextlib

            return contextlib.nullcontext()

    for step in range(5):
        list(obj.updates(Run, step))
    t = torch.cat(seen)
    assert len(t) == 40_000
    bins = torch.arange(0, 1001, 100)
    counts = torch.histc(t.double(), bins=10, min=0, max=1000) / len(t)
    probs = timestep_probs(1000, law, alpha)
    expected = torch.stack([probs[bins[i]:bins[i + 1]].sum() for i in range(10)])
    assert (counts - expected).abs().max() < 0.01, (counts, expected)


class _Recorder:
    """A stand-in model: the real scheduler, a trivial output (the law is what is under test)."""

    def __init__(self, base):
        self.scheduler, self.base = base.scheduler, base
        self.takes_prompts, self.takes_labels, self.null_label = False, True, base.null_label
        self.dtype = torch.float32
        self.p = torch.nn.Parameter(torch.zeros(()))

    def null_conditions(self, n):
        return self.base.null_conditions(n)

    def model_output(self, x, t, cond):
        return x * self.p


# ------------------------------------------------------------------------------------- diffusers round trip


def test_trained_controlnet_round_trips_through_the_diffusers_pipeline(tmp_path):
    from chaintune.backends.controlled import load_controlled
    from chaintune.controlnet.trainer import control_images, train_controlnet
    from chaintune.testing import assert_controlnet_run_matches_diffusers, tiny_sd_model

    x, y = _digits(32, 3)
    cfg = {"model": "tiny-sd", "steps": 3, "batch_size": 4, "lr": 1e-2, "eval_every": 0, "eval_samples": 2,
           "grid_samples": 2, "sample_steps": 2, **FAST}
    train_controlnet(cfg, tmp_path / "run", base=tiny_sd_model(), data=(x, y), eval_data=(x[:2], y[:2]))
    model = load_controlled(str(tmp_path / "run"))
    assert float(model.denoiser.controlnet_mid_block.weight.detach().abs().max()) > 0  # it trained: not the no-op
    assert_controlnet_run_matches_diffusers(tmp_path / "run", control_images(model, "edges", x[:2]), steps=4)


# ------------------------------------------------------------------------------------- condition extractors


def _digit_uint8() -> np.ndarray:
    x, _ = _digits(1)
    return (x[0, 0].numpy() * 255).round().astype(np.uint8)


@pytest.mark.parametrize("kind", ["edges", "silhouette"])
def test_extractors_agree_across_grey_rgb_rgba_and_16bit(kind):
    from PIL import Image

    from chaintune.data.conditions import extract

    grey = _digit_uint8()
    ref = extract(kind, grey)
    assert ref.shape == (1, 1, 16, 16) and 0 < float(ref.mean()) < 1
    rgb = np.repeat(grey[..., None], 3, axis=2)
    rgba = np.concatenate([rgb, np.full_like(grey[..., None], 255)], axis=2)
    wide = grey.astype(np.uint16) * 257  # the same picture in 16 bits
    for img in (rgb, rgba, wide, Image.fromarray(grey), Image.fromarray(rgb), Image.fromarray(rgba, "RGBA"),
                Image.fromarray(wide), torch.from_numpy(grey).float() / 255):
        torch.testing.assert_close(extract(kind, img), ref, atol=1e-5, rtol=0)
    # RGBA: alpha composites over black, so a transparent image has no edges and no silhouette
    clear = rgba.copy()
    clear[..., 3] = 0
    assert float(extract(kind, clear).abs().max()) == 0


def test_extractors_read_16bit_png_files(tmp_path):
    from PIL import Image

    from chaintune.data.conditions import edges, load_condition_image

    wide = _digit_uint8().astype(np.uint16) * 257
    Image.fromarray(wide).save(tmp_path / "d16.png")
    grey = load_condition_image(tmp_path / "d16.png")
    assert grey.shape == (1, 1, 16, 16) and abs(float(grey.max()) - wide.max() / 65535) < 1e-6
    torch.testing.assert_close(edges(tmp_path / "d16.png"), edges(wide))


@pytest.mark.parametrize("bad,needle", [
    (np.zeros((8, 8, 5), np.uint8), "channels"),
    (np.zeros((0, 8), np.uint8), "empty"),
    (np.full((8, 8), np.nan, np.float32), "NaN"),
    (np.full((8, 8), 3.0, np.float32), r"\[0, 1\]"),
    (np.zeros((8, 8), np.complex64), "dtype"),
    (np.zeros((2, 2, 2, 2), np.uint8), "shape"),
    ("no/such/image.png", "does not exist"),
    ([[0, 1]], "tensor, numpy array, PIL image or path"),
])
def test_bad_condition_inputs_get_a_clear_error(bad, needle):
    from chaintune.data.conditions import edges

    with pytest.raises(ChaintuneError, match=needle):
        edges(bad)


def test_condition_iou_is_one_for_the_source_and_lower_for_another():
    from chaintune.data.conditions import condition_iou, edges

    x, _ = _digits(8)
    assert torch.allclose(condition_iou("edges", x, edges(x)), torch.ones(8))
    assert float(condition_iou("edges", x.roll(1, 0), edges(x)).mean()) < 0.8


# ------------------------------------------------------------------------------------- CLI


def test_cli_trains_on_tiny_sd_then_samples_with_the_controlnet(tmp_path):
    from PIL import Image

    from chaintune.backends.run_dir import read_run_info
    from chaintune.cli.main import main
    from chaintune.testing import tiny_sd_pipeline

    tiny_sd_pipeline().save_pretrained(str(tmp_path / "sd"))
    run = tmp_path / "run"
    main(["controlnet", "--model", str(tmp_path / "sd"), "--steps", "2", "--batch-size", "4", "--eval-samples",
          "4", "--grid-samples", "2", "--sample-steps", "2", "--condition", "silhouette", "--out", str(run),
          "--no-tensorboard", "--no-report", "--no-progress"])
    info = read_run_info(run)
    assert info["status"] == "finished" and info["timestep_law"] == "psi" and info["condition"] == "silhouette"
    assert (run / "model" / "controlnet" / "config.json").exists()
    assert (run / "samples" / "step_000002.png").exists()
    Image.fromarray(_digit_uint8()).convert("RGBA").save(tmp_path / "cond.png")
    main(["sample", "--controlnet", str(run), "--condition", str(tmp_path / "cond.png"), "--num", "2", "--steps",
          "2", "--prompt", "a 3", "--out", str(tmp_path / "samples")])
    assert (tmp_path / "samples" / "grid.png").exists() and (tmp_path / "samples" / "sample_0001.png").exists()


def test_sample_condition_without_controlnet_is_refused(tmp_path):
    from chaintune.cli.main import main

    with pytest.raises(SystemExit) as e:
        main(["sample", "--condition", str(tmp_path / "x.png"), "--out", str(tmp_path / "o")])
    assert e.value.code == 2


def test_builtin_digits_cond_loads_with_its_class_tokens():
    import chaintune
    from chaintune.backends import ASSETS
    from chaintune.backends.pixel_cond import PixelCondModel

    if not (ASSETS / "digits-cond" / "model_index.json").exists():
        pytest.skip("builtin:digits-cond not built in this checkout")
    m = chaintune.load("builtin:digits-cond")
    assert isinstance(m, PixelCondModel) and m.num_classes == 10 and m.null_label == 10
    assert m.pixel_shape == (1, 16, 16)


def test_lora_on_the_controlnet_reaches_the_zero_convolutions(tmp_path):
    """--peft lora: LoRA on attention alone would leave the zero convolutions at zero (a no-op forever)."""
    from chaintune.backends.controlled import load_controlled
    from chaintune.controlnet.trainer import control_images, train_controlnet

    x, y = _digits(16)
    base = tiny_pixel_model()
    res = train_controlnet({"model": "tiny", "steps": 3, "batch_size": 4, "lr": 1e-2, "peft": "lora", "eval_every": 0,
                            "eval_samples": 2, "grid_samples": 2, "sample_steps": 2, **FAST}, tmp_path / "run",
                           base=base, data=(x, y), eval_data=(x[:2], y[:2]))
    assert any(n.startswith("controlnet_mid_block.lora_") for n in res.trainable)
    model = load_controlled(str(tmp_path / "run"))  # merged into a plain ControlNetModel
    cond = Conditions(labels=y[:2], control=control_images(model, "edges", x[:2]))
    xt, t = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(0)), torch.tensor([100, 800])
    with torch.no_grad():
        assert (model.model_output(xt, t, cond) - base.model_output(xt, t, cond)).abs().max() > 1e-3


def test_every_controlnet_option_appears_in_help_and_config_round_trips():
    import yaml
    from typer.testing import CliRunner

    from chaintune.cli.main import app
    from chaintune.controlnet.config import ControlNetConfig
    from chaintune.options import from_dict, specs, to_dict

    text = CliRunner().invoke(app, ["controlnet", "--help"], terminal_width=80).output
    for s in specs(ControlNetConfig()):
        assert "--" + s.name.replace("_", "-") in text, s.name
    assert "SDXL" in text and "…" not in text
    cfg = ControlNetConfig.from_dict({"method": "plain", "alpha": 2.0, "condition": "silhouette"})
    assert from_dict(ControlNetConfig, yaml.safe_load(yaml.safe_dump(to_dict(cfg)))) == cfg
