"""`chaintune align --pilot`: probes over LRs (and estimators), the choice (best held-out reward without an alarm),
the full run with the choice, and the record in the run's status file, config and report."""

from __future__ import annotations

import json

import pytest

from chaintune.align.config import AlignConfig
from chaintune.align.objective import align_pilot
from chaintune.errors import ChaintuneError
from chaintune.run.pilot import Probe, choose, pilot_steps

FAST = {"tensorboard": False, "report": False, "progress": False, "save_every": 0}


def _p(est, lr, score, alarms=()):
    return Probe({"estimator": est, "lr": lr}, score, 0.0, list(alarms), 1.0)


def test_choose_takes_the_best_probe_without_an_alarm():
    probes = [_p("rlr", 1e-4, 0.5), _p("rlr", 3e-4, 0.9, ["nn_distance 2x"]), _p("ddpo", 1e-4, 0.7),
              _p("rlr", 1e-3, float("nan"))]
    assert choose(probes).settings == {"estimator": "ddpo", "lr": 1e-4}
    with pytest.raises(ChaintuneError, match="lower --pilot-lrs"):
        choose([_p("rlr", 3e-4, 0.9, ["collapse"]), _p("rlr", 1e-3, float("nan"))])


def test_pilot_grid_and_the_config_it_returns(monkeypatch):
    import chaintune.align.objective as objective

    cfg = AlignConfig.from_dict({"steps": 100, "pilot": True, "pilot_lrs": "1e-4,3e-4",
                                 "pilot_estimators": "rlr,reinforce"})
    assert pilot_steps(100, 0) == 20 and pilot_steps(30, 0) == 10 and pilot_steps(4, 0) == 4
    seen = []
    score = {("rlr", 1e-4): 0.2, ("rlr", 3e-4): 0.8, ("reinforce", 1e-4): 0.5, ("reinforce", 3e-4): 0.9}

    class FakeTrainer:  # stands in for a probe run: scores the (estimator, LR) it was given
        def __init__(self, c, objective, **kw):
            self.c, self.state = c, {}
            seen.append((c.estimator.name, c.optim.lr, c.optim.steps, c.guards.on_hacking, c.pilot.pilot,
                         kw["out"]))

        def fit(self):
            key = (self.c.estimator.name, self.c.optim.lr)
            if key == ("reinforce", 3e-4):
                self.state["hacking"] = [{"reason": "diversity fell"}]
            return type("R", (), {"final": {"eval/heldout_reward": score[key]},
                                  "first_eval": {"eval/heldout_reward": 0.1}})()

    monkeypatch.setattr(objective, "Trainer", FakeTrainer)
    full, record = align_pilot(cfg, log=lambda s: None)
    assert [(e, lr) for e, lr, *_ in seen] == [("rlr", 1e-4), ("rlr", 3e-4), ("reinforce", 1e-4), ("reinforce", 3e-4)]
    assert all(steps == 20 and hack == "warn" and not pilot and out is None for *_, steps, hack, pilot, out in seen)
    assert (full.estimator.name, full.optim.lr, full.pilot.pilot, full.optim.steps) == ("rlr", 3e-4, False, 100)
    assert cfg.optim.lr == 1e-4 and cfg.pilot.pilot  # the caller's config is left as it was
    assert record["chosen"] == {"estimator": "rlr", "lr": 3e-4} and len(record["probes"]) == 4
    assert record["probes"][3]["alarms"] == ["diversity fell"]


@pytest.mark.parametrize("bad,needle", [({"pilot_lrs": "1e-4,x"}, "--pilot-lrs"), ({"pilot_lrs": "0"}, "positive"),
                                        ({"pilot_estimators": "rlr,nope"}, "nope")])
def test_bad_pilot_options_are_refused(bad, needle):
    with pytest.raises(ChaintuneError, match=needle):
        AlignConfig.from_dict({"pilot": True, **bad}).validate()


def test_cli_pilot_probes_then_runs_with_the_choice(tmp_path, capsys):
    from chaintune.cli.main import main

    run = tmp_path / "run"
    main(["align", "--reward", "digit:3", "--steps", "3", "--batch-size", "8", "--sample-steps", "5",
          "--eval-samples", "8", "--pilot", "--pilot-lrs", "1e-4,3e-4", "--pilot-steps", "2", "--out", str(run),
          "--no-tensorboard", "--no-progress"])
    out = capsys.readouterr().out
    assert "pilot 2/2" in out and "pilot: chose" in out
    info = json.loads((run / "chaintune_run.json").read_text())
    pilot = info["pilot"]
    assert [p["settings"]["lr"] for p in pilot["probes"]] == [1e-4, 3e-4] and pilot["steps"] == 2
    usable = [p for p in pilot["probes"] if not p["alarms"]]
    assert pilot["chosen"] == max(usable, key=lambda p: p["score"])["settings"]
    assert info["config"]["lr"] == pilot["chosen"]["lr"] and info["config"]["pilot"] is False
    assert "Pilot (2 steps a probe)" in (run / "report.html").read_text()


def test_pilot_refuses_an_occupied_out_before_probing(tmp_path, capsys):
    from chaintune.cli.main import main

    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "mine.txt").write_text("user data")
    with pytest.raises(SystemExit) as e:
        main(["align", "--steps", "3", "--pilot", "--out", str(tmp_path / "run"), "--no-progress"])
    assert e.value.code == 2
    captured = capsys.readouterr()
    assert "pilot" not in captured.out and (tmp_path / "run" / "mine.txt").read_text() == "user data"


def test_transfer_pilot_compares_methods_by_held_out_fid(tmp_path, capsys):
    from chaintune.cli.main import main

    run = tmp_path / "run"
    main(["transfer", "--steps", "4", "--batch-size", "8", "--eval-samples", "20", "--sample-steps", "3",
          "--bank-size", "20", "--bank-steps", "3", "--bank-dir", str(tmp_path / "banks"), "--pilot", "--pilot-lrs",
          "1e-4,1e-3", "--pilot-steps", "2", "--pilot-schedule", "--out", str(run), "--no-tensorboard",
          "--no-progress"])
    out = capsys.readouterr().out
    assert "pilot 4/4" in out and "pilot 5/5" in out and "alpha" in out
    info = json.loads((run / "chaintune_run.json").read_text())
    probes = info["pilot"]["probes"]
    assert [p["settings"] for p in probes[:4]] == [{"method": m, "lr": lr} for m in ("diff-tuning", "plain")
                                                   for lr in (1e-4, 1e-3)]
    # the fifth: Diff-Tuning at its best LR with the schedule the best plain probe's chain of forgetting gave
    sched = info["pilot"]["schedule"]
    best_dt = max(probes[:2], key=lambda p: p["score"])["settings"]["lr"]
    assert probes[4]["settings"] == {"method": "diff-tuning", "lr": best_dt, "alpha": sched["alpha"],
                                     "beta": sched["beta"], "lam": sched["lam"]}
    assert -0.9 <= sched["alpha"] <= 4 and -0.9 <= sched["beta"] <= 4 and 0 <= sched["lam"] <= 0.2
    assert "Derived from the best plain probe" in (run / "report.html").read_text()
    assert all(p["score"] < 0 for p in probes)  # -FID
    best = max(probes, key=lambda p: p["score"])["settings"]
    assert info["pilot"]["chosen"] == best
    assert (info["config"]["method"], info["config"]["lr"], info["config"]["pilot"]) == (best["method"], best["lr"],
                                                                                         False)


def test_transfer_pilot_options_are_checked():
    from chaintune.transfer.config import TransferConfig

    with pytest.raises(ChaintuneError, match="--pilot-methods"):
        TransferConfig.from_dict({"pilot": True, "pilot_methods": "diff-tuning,lora"}).validate()


def test_transfer_pilot_without_the_derived_schedule(tmp_path, capsys):
    from chaintune.cli.main import main

    run = tmp_path / "run"
    main(["transfer", "--steps", "4", "--batch-size", "8", "--eval-samples", "20", "--sample-steps", "3",
          "--bank-size", "20", "--bank-steps", "3", "--bank-dir", str(tmp_path / "banks"), "--pilot", "--pilot-lrs",
          "1e-3", "--pilot-steps", "2", "--out", str(run), "--no-tensorboard", "--no-progress"])  # the default
    info = json.loads((run / "chaintune_run.json").read_text())
    assert len(info["pilot"]["probes"]) == 2 and "schedule" not in info["pilot"]


@pytest.mark.parametrize("power", [0.5, 1.0, 2.0])
def test_a_gain_growing_as_a_power_of_t_gives_that_power_back(power):
    """The paper's premise as a measurement (the target's need grows as (t + 1)^a) returns psi's power a; the
    check uses the discrete law (timestep_probs), independent of the closed form derive_schedule solves."""
    import torch

    from chaintune.transfer.forgetting import derive_schedule
    from chaintune.transfer.timesteps import timestep_probs

    T = 1000
    ts = list(range(0, T, 10))
    gain = [(t + 1) ** power for t in ts]
    d = derive_schedule(ts, [1.0 + g for g in gain], [1.0] * len(ts), T)
    assert d["alpha"] == pytest.approx(power, abs=0.1)  # the grid of every 10th t, against the continuous law
    mean_psi = float((timestep_probs(T, "psi", d["alpha"]) * torch.arange(T)).sum())
    assert mean_psi == pytest.approx(d["gain_mean_t"], abs=0.01 * T)
    if power == 1.0:  # a linear ramp is what alpha = beta = 1 assume: the paper's schedule comes back (up to the
        # grid: the gain's maximum sits at t = 990, where s = 1 - g / max g reaches 0, not at T)
        assert d["beta"] == pytest.approx(1.0, abs=0.1) and d["lam"] == pytest.approx(0.1, abs=0.005)


def test_a_gain_at_low_noise_gives_falling_laws_and_no_gain_keeps_the_paper_schedule():
    from chaintune.transfer.forgetting import derive_schedule
    from chaintune.transfer.timesteps import timestep_probs

    T = 1000
    ts = list(range(0, T, 50))
    low = derive_schedule(ts, [2.0 if t < 300 else 1.0 for t in ts], [1.0] * len(ts), T)
    assert low["alpha"] < 0 and low["beta"] < 0  # reconsolidate at small t, retain at large t
    p = timestep_probs(T, "psi", low["alpha"])
    assert p[0] > p[-1] and abs(float(p.sum()) - 1) < 1e-12
    same = derive_schedule(ts, [1.0] * len(ts), [1.0 + 0.1] * len(ts), T)  # tuning made the target worse
    assert (same["alpha"], same["beta"], same["lam"]) == (1.0, 1.0, 0.1)
