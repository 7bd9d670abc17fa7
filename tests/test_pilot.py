"""`chaintune align --pilot`: probes over LRs (and estimators), the choice (best held-out reward without an alarm),
the full run with the choice, and the record in the run's status file, config and report."""

from __future__ import annotations

import json

import pytest

from chaintune.align.config import AlignConfig
from chaintune.align.pilot import Probe, choose, pilot_steps, run_pilot
from chaintune.errors import ChaintuneError

FAST = {"tensorboard": False, "report": False, "progress": False, "save_every": 0}


def _p(est, lr, score, alarms=()):
    return Probe(est, lr, score, 0.0, list(alarms), 1.0)


def test_choose_takes_the_best_probe_without_an_alarm():
    probes = [_p("rlr", 1e-4, 0.5), _p("rlr", 3e-4, 0.9, ["nn_distance 2x"]), _p("ddpo", 1e-4, 0.7),
              _p("rlr", 1e-3, float("nan"))]
    assert (choose(probes).estimator, choose(probes).lr) == ("ddpo", 1e-4)
    with pytest.raises(ChaintuneError, match="lower --pilot-lrs"):
        choose([_p("rlr", 3e-4, 0.9, ["collapse"]), _p("rlr", 1e-3, float("nan"))])


def test_pilot_grid_and_the_config_it_returns():
    cfg = AlignConfig.from_dict({"steps": 100, "pilot": True, "pilot_lrs": "1e-4,3e-4",
                                 "pilot_estimators": "rlr,reinforce"})
    assert pilot_steps(cfg) == 20
    seen = []

    def fit(c):  # stands in for a probe run: scores the (estimator, LR) it was given
        seen.append((c.estimator.name, c.optim.lr, c.optim.steps, c.guards.on_hacking, c.pilot.pilot))
        score = {("rlr", 1e-4): 0.2, ("rlr", 3e-4): 0.8, ("reinforce", 1e-4): 0.5, ("reinforce", 3e-4): 0.9}
        alarms = ["diversity fell"] if (c.estimator.name, c.optim.lr) == ("reinforce", 3e-4) else []
        return {"eval/heldout_reward": score[c.estimator.name, c.optim.lr]}, {"eval/heldout_reward": 0.1}, alarms

    full, record = run_pilot(cfg, fit, log=lambda s: None)
    assert [(e, lr) for e, lr, *_ in seen] == [("rlr", 1e-4), ("rlr", 3e-4), ("reinforce", 1e-4), ("reinforce", 3e-4)]
    assert all(steps == 20 and hack == "warn" and not pilot for *_, steps, hack, pilot in seen)
    assert (full.estimator.name, full.optim.lr, full.pilot.pilot, full.optim.steps) == ("rlr", 3e-4, False, 100)
    assert cfg.optim.lr == 1e-4 and cfg.pilot.pilot  # the caller's config is left as it was
    assert record["chosen"] == {"estimator": "rlr", "lr": 3e-4} and len(record["probes"]) == 4


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
    assert [p["lr"] for p in pilot["probes"]] == [1e-4, 3e-4] and pilot["steps"] == 2
    usable = [p for p in pilot["probes"] if not p["alarms"]]
    assert pilot["chosen"]["lr"] == max(usable, key=lambda p: p["score"])["lr"]
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
