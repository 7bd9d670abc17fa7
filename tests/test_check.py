"""`chaintune check`: passes on healthy models of every backend, and catches each planted fault with one line that
says what to change."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler

from chaintune.cli.main import main
from chaintune.plan.check import check, format_report
from chaintune.rewards import FramesReward, FunctionReward
from chaintune.testing import tiny_flow_model, tiny_flux_model, tiny_sd_model, tiny_sdxl_model, tiny_wan_model

BRIGHT = FunctionReward(lambda images: images.float().flatten(1).mean(1), differentiable=True, name="brightness")
VIDEO_BRIGHT = FramesReward(BRIGHT, "mean")  # a video model takes a video reward: per-frame brightness, averaged


def _by_name(report):
    return {f.name: f for f in report.findings}


@pytest.mark.parametrize("factory", [tiny_sd_model, tiny_sdxl_model, tiny_flow_model, tiny_flux_model, tiny_wan_model])
def test_healthy_models_pass_every_check_and_the_sampler_equals_their_pipeline(factory):
    reward = VIDEO_BRIGHT if factory is tiny_wan_model else BRIGHT
    report = check(factory(), reward, steps=3, n=2, prompts=["a red cube", "a blue ball"], guidance_scale=2.0)
    found = _by_name(report)
    assert report.ok, format_report(report)
    assert found["sampler"].ok is True and "equals the diffusers pipeline" in found["sampler"].detail


def test_a_scheduler_ported_wrong_is_caught():
    model = tiny_sd_model()
    model.scheduler = DDIMScheduler.from_config({**model.scheduler.config, "beta_end": 0.02})
    found = _by_name(check(model, BRIGHT, steps=3, prompts=["a cat"]))
    assert found["sampler"].ok is False and "scheduler" in found["sampler"].fix


def test_an_image_reward_on_a_video_model_is_caught():
    found = _by_name(check(tiny_wan_model(), BRIGHT, steps=3, prompts=["a cat"]))
    assert found["reward"].ok is False and "[n, C, H, W]" in found["reward"].detail


@pytest.mark.parametrize("fn, says", [
    (lambda images: images.float().mean(), "shape"),  # one number for the batch
    (lambda images: images.float().flatten(1).mean(1) * float("nan"), "non-finite"),
    (lambda images: images.detach().float().flatten(1).mean(1), "no graph"),  # claims a gradient it lacks
])
def test_bad_rewards_are_caught(fn, says):
    reward = FunctionReward(fn, differentiable=True, name="mine")
    report = check(tiny_sd_model(), reward, steps=3, prompts=["a cat"], estimator="reinforce")
    found = _by_name(report)
    assert not report.ok and found["reward"].ok is False and says in found["reward"].detail


def test_frozen_adapters_are_caught():
    model = tiny_sd_model()
    model.denoiser.requires_grad_(False)
    found = _by_name(check(model, BRIGHT, steps=3, prompts=["a cat"], peft="none"))
    assert found["gradient"].ok is False and "no trainable parameters" in found["gradient"].detail


def test_cli_check_on_builtin_digits_and_a_budget_nothing_fits(capsys):
    main(["check", "--reward", "digit:3", "--sample-steps", "4"])
    out = capsys.readouterr().out
    assert "log-probs" in out and "all checks passed" in out
    with pytest.raises(SystemExit) as e:
        main(["check", "--reward", "digit:3", "--sample-steps", "4", "--memory", "1KB"])
    assert e.value.code == 3
    out = capsys.readouterr().out
    assert "FAIL" in out and "memory" in out and "fix: raise the budget" in out
    assert torch.get_num_threads() >= 1


def test_builtin_video_model_checks_with_the_prompts_it_ships(capsys):
    main(["check", "--model", "builtin:moving-digits", "--reward", "moving-digit", "--sample-steps", "4"])
    out = capsys.readouterr().out
    assert "all checks passed" in out and "n/a   sampler" in out  # pixel-space: no diffusers pipeline to compare


def test_transfer_data_bank_and_features_are_checked():
    report = check("builtin:digits", data="digits-fewshot:10", steps=3)
    names = {f.name: f for f in report.findings}
    assert report.ok and set(names) == {"data", "bank", "features"}
    assert "100 images" in names["data"].detail and "10 classes" in names["data"].detail
    assert "128-dim" in names["features"].detail  # digits-cnn, what transfer's auto picks for digit data


@pytest.mark.parametrize("data,feature,failed", [("/no/such/folder", "auto", "data"),
                                                 ("digits:test", "inception:/no/weights.pt", "features")])
def test_bad_transfer_inputs_fail_their_check_with_a_fix(tmp_path, capsys, data, feature, failed):
    from chaintune.cli.main import main

    with pytest.raises(SystemExit) as e:
        main(["check", "--data", data, "--feature", feature, "--sample-steps", "3"])
    assert e.value.code == 3
    out = capsys.readouterr().out
    line = next(ln for ln in out.splitlines() if ln.strip().startswith("FAIL"))
    assert line.split()[1] == failed and "fix:" in out


def test_check_needs_a_reward_or_data(capsys):
    from chaintune.cli.main import main

    with pytest.raises(SystemExit) as e:
        main(["check"])
    assert e.value.code == 2 and "--data" in capsys.readouterr().err
