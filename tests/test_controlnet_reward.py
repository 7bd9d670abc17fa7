"""Reward fine-tuning of a ControlNet (chaintune align --controlnet): only the ControlNet trains, the run loads in
diffusers' ControlNet pipeline and in `chaintune sample --controlnet`, the consistency rewards' gradients and
held-out twins, the control reaching a user's reward, diversity under one control."""

from __future__ import annotations

import textwrap

import pytest
import torch

from chaintune.errors import ChaintuneError

FAST = {"tensorboard": False, "report": False, "progress": False, "save_every": 0}
CN = {"steps": 3, "batch_size": 4, "lr": 1e-2, "eval_every": 0, "eval_samples": 2, "grid_samples": 2,
      "sample_steps": 2, **FAST}


def _digits(n: int, channels: int = 1):
    from chaintune.data import digits_split

    x, y = digits_split("train", 16)
    return x[:n].repeat(1, channels, 1, 1), y[:n]


def _tiny_pixel_base():
    from diffusers import DDPMScheduler

    from chaintune.backends.pixel_cond import PixelCondModel, build_cond_unet
    from chaintune.pretrain.config import ArchConfig

    torch.manual_seed(0)
    unet = build_cond_unet(ArchConfig(resolution=16, block_out_channels=[8, 16], num_classes=10, norm_num_groups=4))
    return PixelCondModel(unet, DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2"))


@pytest.fixture(scope="module")
def pixel_controlnet(tmp_path_factory):
    """A supervised ControlNet run (3 steps) over a tiny pixel base, trained on digits:train's edges."""
    from chaintune.controlnet.trainer import train_controlnet

    out = tmp_path_factory.mktemp("cn") / "run"
    x, y = _digits(64)
    train_controlnet({"model": "tiny", **CN}, out, base=_tiny_pixel_base(), data=(x, y), eval_data=(x[:2], y[:2]))
    return out


def _align(controlnet, out, **over):
    from chaintune.align.config import AlignConfig
    from chaintune.align.objective import align_run

    cfg = {"reward": "edge-consistency", "controlnet": str(controlnet), "estimator": "rlr", "steps": 2,
           "batch_size": 8, "sample_steps": 4, "eval_every": 0, "eval_samples": 8, "lr": 1e-2, **FAST,
           "out": str(out), **over}
    return align_run(AlignConfig.from_dict(cfg))


def _state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


@pytest.mark.parametrize("estimator", ["rlr", "reinforce", "refl"])  # refl: ControlNet++'s one-step reward
def test_only_the_controlnet_changes(pixel_controlnet, tmp_path, estimator):
    from chaintune.backends.controlled import load_controlled

    before = load_controlled(str(pixel_controlnet))
    res = _align(pixel_controlnet, tmp_path / "al", estimator=estimator, final_model="last")
    assert res.trainable and all(not n.startswith("base_") for n in res.trainable)
    after = load_controlled(str(tmp_path / "al"))
    base0, base1 = _state(before.base.denoiser), _state(after.base.denoiser)
    assert base0.keys() == base1.keys()
    for k in base0:  # the frozen base: bit for bit
        assert torch.equal(base0[k], base1[k]), k
    cn0, cn1 = _state(before.denoiser), _state(after.denoiser)
    moved = [k for k in cn0 if not torch.equal(cn0[k], cn1[k])]
    assert len(moved) > len(cn0) // 2, f"only {len(moved)} of {len(cn0)} ControlNet tensors trained"


def test_run_records_the_controlnet_and_evaluates_under_held_out_controls(pixel_controlnet, tmp_path):
    from chaintune.backends.run_dir import read_run_info

    res = _align(pixel_controlnet, tmp_path / "al", eval_every=2)
    info = read_run_info(tmp_path / "al")
    assert info["controlnet"] == str(pixel_controlnet) and info["condition"] == "edges"
    assert info["control_data"] == "digits:train"  # read from the supervised run
    m = res.final
    for key in ("eval/condition_iou", "eval/digit_agreement", "eval/heldout_reward", "eval/diversity",
                "eval/diversity_all"):
        assert key in m, key
    assert 0 <= m["eval/condition_iou"] <= 1 and m["eval/heldout_reward"] <= 0  # edge-chamfer: minus a distance


def test_lora_on_the_controlnet_is_merged_into_a_plain_controlnet(pixel_controlnet, tmp_path):
    from chaintune.backends.controlled import load_controlled

    res = _align(pixel_controlnet, tmp_path / "al", peft="lora", lora_rank=2)
    assert any(n.startswith("controlnet_mid_block.lora_") for n in res.trainable)  # the zero convolutions learn
    after = load_controlled(str(tmp_path / "al"))
    assert not any("lora" in k for k in after.denoiser.state_dict())
    before = load_controlled(str(pixel_controlnet))
    assert not torch.equal(before.denoiser.controlnet_mid_block.weight, after.denoiser.controlnet_mid_block.weight)


def test_reward_tuned_controlnet_round_trips_through_the_diffusers_pipeline(tmp_path):
    from chaintune.backends.controlled import load_controlled
    from chaintune.controlnet.trainer import control_images, train_controlnet
    from chaintune.testing import assert_controlnet_run_matches_diffusers, tiny_sd_model

    x, y = _digits(32, 3)
    train_controlnet({"model": "tiny-sd", **CN}, tmp_path / "cn", base=tiny_sd_model(), data=(x, y),
                     eval_data=(x[:2], y[:2]))
    _align(tmp_path / "cn", tmp_path / "al", estimator="full-backprop", sample_steps=2, batch_size=2,
           eval_samples=2, peft="lora", lora_rank=2, kl_weight=0.0)
    model = load_controlled(str(tmp_path / "al"))
    assert_controlnet_run_matches_diffusers(tmp_path / "al", control_images(model, "edges", x[:2]))
    # `chaintune check --controlnet` holds the same chain to the same pipeline (reference_images)
    from chaintune.plan.check import check

    report = check("builtin:digits", "edge-consistency", controlnet=str(tmp_path / "al"), n=2, steps=3,
                   prompts=["a 3", "a 7"], guidance_scale=3.0, peft="none")
    sampler = next(f for f in report.findings if f.name == "sampler")
    assert sampler.ok is True, sampler.detail


@pytest.mark.parametrize("spec,kind", [("edge-consistency", "edges"), ("silhouette-consistency", "silhouette")])
def test_consistency_rewards_gradients_match_finite_differences(spec, kind):
    from chaintune.data.conditions import extract
    from chaintune.rewards import get_reward

    torch.manual_seed(0)
    x = (torch.rand(2, 1, 8, 8, dtype=torch.float64) * 0.8 + 0.1).requires_grad_()
    control = extract(kind, torch.rand(2, 1, 8, 8)).double()
    reward = get_reward(spec)
    assert reward.differentiable
    assert torch.autograd.gradcheck(lambda im: reward(im, metadata={"control": control}), (x,), eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("spec,kind", [("edge-consistency", "edges"), ("silhouette-consistency", "silhouette"),
                                       ("edge-chamfer", "edges"), ("silhouette-iou", "silhouette")])
def test_consistency_rewards_prefer_the_sample_that_follows_its_control(spec, kind):
    """A digit scores higher against its own control than against another digit's (3-sigma margin not needed:
    the ordering holds for each of 16 digits)."""
    from chaintune.data.conditions import extract
    from chaintune.rewards import get_reward

    x, _ = _digits(16)
    own, other = extract(kind, x), extract(kind, x.roll(1, 0))
    r = get_reward(spec)
    assert (r(x, metadata={"control": own}) > r(x, metadata={"control": other})).all()


def test_edge_chamfer_equals_a_brute_force_chamfer():
    from chaintune.data.conditions import edges
    from chaintune.rewards import get_reward

    x, _ = _digits(4)
    control = edges(x.roll(1, 0))
    got = get_reward("edge-chamfer")(x, metadata={"control": control})
    for i in range(4):  # an independent computation: nearest edge pixel by pairwise distances of coordinates
        a, b = edges(x[i : i + 1])[0, 0].nonzero().double(), control[i, 0].nonzero().double()
        d = torch.cdist(a, b)
        want = -0.5 * (float(d.min(1).values.mean()) + float(d.min(0).values.mean()))
        assert got[i].item() == pytest.approx(want, abs=1e-5)


def test_consistency_reward_without_a_control_says_what_to_do():
    from chaintune.rewards import get_reward

    with pytest.raises(ChaintuneError, match="--controlnet"):
        get_reward("edge-consistency")(torch.rand(2, 1, 8, 8))


def test_the_control_reaches_a_users_reward_through_its_metadata(pixel_controlnet, tmp_path, monkeypatch):
    (tmp_path / "ct_control_reward.py").write_text(textwrap.dedent("""
        import torch
        SEEN = []

        def follow(images, metadata):
            control = metadata["control"]
            SEEN.append(control.detach().clone())
            return -(images.mean(1, keepdim=True) - control[:, :1]).abs().flatten(1).mean(1)
        follow.differentiable = True
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    import ct_control_reward

    from chaintune.backends.controlled import load_controlled
    from chaintune.data import digits_split
    from chaintune.data.conditions import edges

    _align(pixel_controlnet, tmp_path / "al", reward="ct_control_reward:follow", heldout_reward="", steps=1,
           eval_samples=4)
    pool = edges(digits_split("train", 16)[0])  # the ControlNet's training data's edge maps
    assert ct_control_reward.SEEN
    channels = load_controlled(str(pixel_controlnet)).conditioning_channels
    assert all(c.shape[1:] == (channels, 16, 16) for c in ct_control_reward.SEEN)
    train_batches = [c for c in ct_control_reward.SEEN if len(c) == 8]  # (evaluation: 4, the probe: 2)
    assert train_batches and all(
        ((c[:, None] - pool[None]).abs().flatten(2).amax(2).min(1).values == 0).all() for c in train_batches)


def test_diversity_is_measured_under_one_control():
    from chaintune.align.controls import PER_CONTROL, ControlPool
    from chaintune.metrics import pairwise_diversity

    maps = torch.zeros(3, 1, 16, 16)
    pool = ControlPool(kind="edges", data="x", train=maps, heldout=maps, heldout_maps=maps, heldout_digits=None)
    n = 3 * PER_CONTROL
    torch.manual_seed(0)
    per_control = torch.rand(3, 1, 1, 16, 16)
    same = per_control.repeat_interleave(PER_CONTROL, 0).flatten(0, 1)  # one image per control: collapsed
    m = pool.metrics(same)
    assert m["eval/diversity"] == pytest.approx(0.0, abs=1e-6) and m["eval/diversity_all"] > 0.1
    noisy = (same + 0.1 * torch.randn_like(same)).clamp(0, 1)
    want = sum(pairwise_diversity(noisy[k * PER_CONTROL:(k + 1) * PER_CONTROL]) for k in range(3)) / 3
    assert pool.metrics(noisy)["eval/diversity"] == pytest.approx(want, rel=1e-6)
    assert len(pool.heldout_controls(n)) == n


def test_cli_fine_tunes_then_samples_with_the_reward_tuned_controlnet(pixel_controlnet, tmp_path, capsys):
    from PIL import Image

    from chaintune.cli.main import main

    run = tmp_path / "al"
    main(["align", "--controlnet", str(pixel_controlnet), "--reward", "silhouette-consistency", "--steps", "1",
          "--batch-size", "4", "--sample-steps", "3", "--eval-samples", "4", "--out", str(run), "--no-tensorboard",
          "--no-report", "--no-progress"])
    # the summary tells how to sample it: a ControlNet run needs a condition image, not --model
    assert f"sample: chaintune sample --controlnet {run} --condition IMG" in capsys.readouterr().out
    x, _ = _digits(1)
    Image.fromarray((x[0, 0].numpy() * 255).round().astype("uint8")).save(tmp_path / "cond.png")
    main(["sample", "--controlnet", str(run), "--condition", str(tmp_path / "cond.png"), "--num", "2", "--steps", "2",
          "--out", str(tmp_path / "samples")])
    assert (tmp_path / "samples" / "grid.png").exists()


@pytest.mark.parametrize("args,needle", [
    (["--retention-weight", "0.1"], "retention"),
    (["--control-data", "no/such/folder"], "no/such/folder"),
])
def test_bad_controlnet_options_get_one_error_line(pixel_controlnet, tmp_path, capsys, args, needle):
    from chaintune.cli.main import main

    with pytest.raises(SystemExit) as e:
        main(["align", "--controlnet", str(pixel_controlnet), "--reward", "edge-consistency", "--steps", "1",
              "--out", str(tmp_path / "al"), "--no-progress", *args])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and needle in err
    assert not (tmp_path / "al").exists()  # nothing written


def test_a_run_that_is_not_a_controlnets_is_refused(tmp_path, capsys):
    from chaintune.cli.main import main

    with pytest.raises(SystemExit) as e:
        main(["align", "--controlnet", str(tmp_path / "nothing"), "--reward", "edge-consistency", "--steps", "1",
              "--out", str(tmp_path / "al"), "--no-progress"])
    assert e.value.code == 2 and "--controlnet" in capsys.readouterr().err


def test_estimate_gradient_takes_the_control(pixel_controlnet):
    import chaintune
    from chaintune.backends.controlled import load_controlled
    from chaintune.controlnet.trainer import control_images

    model = load_controlled(str(pixel_controlnet))
    model.denoiser.requires_grad_(True)
    x, _ = _digits(4)
    control = control_images(model, "edges", x)
    grads = chaintune.estimate_gradient(model, "edge-consistency", "full-backprop", 4, steps=3, control=control)
    assert grads and all(torch.isfinite(g).all() for g in grads.values())
    assert sum(float(g.abs().sum()) for g in grads.values()) > 0
    with pytest.raises(ChaintuneError, match="control"):
        chaintune.estimate_gradient(model, "edge-consistency", "full-backprop", 4, steps=3)


def test_check_on_a_controlnet_run_draws_controls_and_reaches_the_controlnet(pixel_controlnet, capsys):
    """`chaintune check --controlnet RUN`: samples follow controls of the run's data, the reward receives them, and
    the gradient reaches the ControlNet's tensors (the pixel base has no diffusers ControlNet pipeline: not
    compared)."""
    from chaintune.cli.main import main
    from chaintune.plan.check import check
    from chaintune.rewards import FunctionReward

    seen = {}

    def follows(images, prompts=None, labels=None, metadata=None):
        seen.setdefault("control", metadata["control"])  # the reward check's call (the estimator's may be smaller)
        return (images * metadata["control"].mean(1, keepdim=True)).flatten(1).mean(1)

    report = check("builtin:digits", FunctionReward(follows, name="follows"), controlnet=str(pixel_controlnet),
                   control_data="digits:train", n=2, steps=3)
    by = {f.name: f for f in report.findings}
    assert by["sampler"].ok is None and by["log-probs"].ok and by["reward"].ok and by["gradient"].ok, report
    assert seen["control"].shape[0] == 2 and float(seen["control"].std()) > 0  # real control images, one a sample
    assert "ControlNet" in report.model
    main(["check", "--controlnet", str(pixel_controlnet), "--reward", "edge-consistency", "--control-data",
          "digits:train", "--sample-steps", "3"])
    out = capsys.readouterr().out
    assert "ok    gradient" in out and "FAIL" not in out
