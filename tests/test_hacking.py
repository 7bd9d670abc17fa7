"""The reward-hacking guard: a deliberately hacking run (high LR, no KL) is caught and keeps its pre-hack best."""

from __future__ import annotations

import json

import torch

import chaintune
from chaintune.align import HackingGuard, align_run
from chaintune.align.config import AlignConfig
from chaintune.run.trainer import format_summary

# no KL guard, an LR that hacks digit:3 within ~10 steps at batch 8 (measured: nn-distance 0.126 -> 0.21)
HACKING = {"reward": "digit:3", "estimator": "rlr", "lr": 1e-4, "kl_weight": 0.0, "spans": 1, "lr_schedule": "constant",
           "steps": 60, "batch_size": 8, "sample_steps": 10,
           "eval_every": 5, "eval_samples": 32, "tensorboard": False, "progress": False, "report": True}


def test_a_hacking_run_is_stopped_and_keeps_its_pre_hack_best(tmp_path):
    res = align_run(AlignConfig.from_dict({**HACKING, "on_hacking": "stop", "out": str(tmp_path / "h")}))
    info = json.loads((tmp_path / "h" / "chaintune_run.json").read_text())
    events = info["hacking"]
    assert events and events[-1]["action"].startswith("stopped")
    # the default patience (2): the first alarm only warns, the next one in a row acts
    assert events[0]["action"].startswith("watching") and events[1]["step"] == events[0]["step"] + 5
    assert res.final["step"] < 60  # stopped early
    best = json.loads((tmp_path / "h" / "best" / "chaintune_run.json").read_text())
    assert best["step"] < events[0]["step"]  # the best evaluation is from before the hack
    rows = [json.loads(x) for x in (tmp_path / "h" / "metrics.jsonl").read_text().splitlines()]
    base_nn = rows[0]["eval/nn_distance"]
    assert best["metrics"]["eval/nn_distance"] <= 1.3 * base_nn
    hacked = [r for r in rows if r["step"] == events[0]["step"] and "eval/nn_distance" in r][0]
    assert hacked["eval/nn_distance"] > 1.3 * base_nn  # what the alarm saw really is off the digits
    # best/ is a model id, and it is what the run saved as its model
    b, final = chaintune.load(tmp_path / "h" / "best"), chaintune.load(tmp_path / "h")
    for (k, x), y in zip(b.denoiser.state_dict().items(), final.denoiser.state_dict().values(), strict=True):
        torch.testing.assert_close(x, y, rtol=0, atol=0, msg=k)
    assert info["final_model"].startswith("best")
    assert "reward hacking at step" in format_summary(res)
    assert "Reward hacking detected" in (tmp_path / "h" / "report.html").read_text()


def test_rollback_halves_the_lr_then_stops(tmp_path):
    res = align_run(AlignConfig.from_dict({**HACKING, "lr": 1e-3, "max_rollbacks": 1, "report": False,
                                           "out": str(tmp_path / "r")}))
    actions = [e["action"] for e in json.loads((tmp_path / "r" / "chaintune_run.json").read_text())["hacking"]
               if not e["action"].startswith("watching")]
    assert actions[0].startswith("rolled back") and actions[-1].startswith("stopped")
    rows = [json.loads(x) for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines() if '"lr"' in x]
    assert min(r["lr"] for r in rows) == 0.5e-3  # after the rollback
    assert res.final["step"] < 60


def test_patience_acts_only_on_alarms_in_a_row():
    """hacking_patience = 2: an alarm followed by a clean evaluation never acts; two in a row do."""
    from types import SimpleNamespace

    from chaintune.run.trainer import AlarmPolicy, Evaluation, Trainer

    lines: list[str] = []
    policy = AlarmPolicy(action="stop", patience=2, max_rollbacks=0, name="hacking", label="reward hacking")
    t = SimpleNamespace(objective=SimpleNamespace(alarm_policy=policy), state={}, best={"step": 5},
                        log_line=lines.append)
    verdicts = []
    for alarm in ["nn 1.4x", None, "nn 1.4x", "nn 1.5x"]:
        t._last_evaluation = Evaluation(metrics={}, alarm=alarm)
        verdicts.append(Trainer._act_on_alarm(t, 10))
    assert verdicts == [False, False, False, True]
    assert [e["action"].split(":")[0] for e in t.state["hacking"]] == ["watching", "watching", "stopped; the best "
                                                                       "evaluation (step 5) is kept"]


def test_guard_rules_on_hand_made_evaluations():
    g = HackingGuard(tolerance=1.3, collapse=0.5)
    base = {"eval/reward": -4.0, "eval/heldout_reward": -4.0, "eval/diversity": 0.3, "eval/nn_distance": 0.12}
    assert g.alarm(base) is None  # the reference
    assert g.alarm({**base, "eval/reward": -2.0, "eval/heldout_reward": -2.0, "eval/nn_distance": 0.15}) is None
    assert "nn_distance" in g.alarm({**base, "eval/nn_distance": 0.16})  # 1.33x
    assert "collapse" in g.alarm({**base, "eval/diversity": 0.14})
    # held-out falls by more than half its gain (-4 -> -2) while the training reward rises: hacking
    assert "held-out reward fell" in g.alarm({**base, "eval/reward": -1.0, "eval/heldout_reward": -3.1})
    assert g.alarm({**base, "eval/reward": -2.5, "eval/heldout_reward": -2.9}) is None  # both fell: not hacking


def test_a_heldout_fall_within_sampling_noise_is_no_alarm():
    """Rule (3) needs the fall to exceed twice the standard error of the difference of the two means as well."""
    base = {"eval/reward": -6.5, "eval/heldout_reward": -5.62, "eval/diversity": 0.3, "eval/nn_distance": 0.12,
            "eval/heldout_reward_se": 0.06}
    for se, alarmed in ((0.06, False), (0.005, True)):
        g = HackingGuard(1.3, 0.5)
        g.alarm(base)
        g.alarm({**base, "eval/reward": -6.3, "eval/heldout_reward": -5.58, "eval/heldout_reward_se": se})  # best
        # held-out 0.03 below its best (more than half its 0.04 gain), training reward higher: noise at se 0.06
        got = g.alarm({**base, "eval/reward": -6.08, "eval/heldout_reward": -5.61, "eval/heldout_reward_se": se})
        assert (got is not None) == alarmed, (se, got)


def test_generic_realism_is_the_distance_to_base_samples():
    g = HackingGuard(1.3, 0.5)
    base = torch.rand(16, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    spread = g.base_distance(base)  # leave-one-out among the base samples
    assert spread > 0
    assert g.base_distance(base) == 0.0  # the same samples sit on the base set
    near = base + 0.01 * torch.randn(base.shape, generator=torch.Generator().manual_seed(1))
    assert g.base_distance(near) < 0.1 * spread  # samples that stay where the base model's are
    far = torch.ones_like(base)  # washed out to white: far from every base sample
    assert g.base_distance(far) > 1.3 * spread
