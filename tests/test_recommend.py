"""`chaintune plan --reward R --memory B`: the estimator the measured rankings pick for the user's setting.

The choice logic is tested on the memory model with made-up step sizes (what fits, which configuration each family
gets), and end to end on builtin:digits (1.1M parameters), where three budgets give the three answers: full backprop
as it is, full backprop checkpointed and micro-batched, and nothing at all.
"""

from __future__ import annotations

import shlex

import pytest
import typer

from chaintune.cli.main import app
from chaintune.errors import ChaintuneError
from chaintune.plan.recommend import RANKINGS, _options, choose

MB = 2**20


def by_family(opts):
    return {o.family: o for o in opts}


def test_each_family_gets_its_best_configuration_within_the_budget():
    # B_h 10 MB a tracked step, B_c 1 MB checkpointed, B_z 0.1 MB stored; T = 20 at batch 8
    opts = by_family(_options(10 * MB, MB, MB // 10, 20, 8, left=300 * MB, differentiable=True))
    assert opts["full-backprop"].fits and not opts["full-backprop"].flags["gradient_checkpointing"]  # 200 MB
    assert opts["rlr"].flags["h"] == 19 and opts["truncated-backprop"].flags["k"] == 20
    tight = by_family(_options(10 * MB, MB, MB // 10, 20, 8, left=25 * MB, differentiable=True))
    fb = tight["full-backprop"]  # (20 x 1 + 10) / 8 = 3.75 MB a sample: micro-batch 4 fits 15 MB, 8 would need 30
    assert fb.fits and fb.flags == {"estimator": "full-backprop", "gradient_checkpointing": True, "batch_size": 4,
                                    "grad_accum": 2}
    assert tight["rlr"].flags["h"] == 1 and tight["truncated-backprop"].flags["k"] == 2  # (1 + 1) x 10 + 2 <= 25
    none = by_family(_options(10 * MB, MB, MB // 10, 20, 8, left=3 * MB, differentiable=True))
    assert not none["full-backprop"].fits and not none["rlr"].fits and none["ddpo"].fits is False
    box = by_family(_options(10 * MB, MB, MB // 10, 20, 8, left=300 * MB, differentiable=False))
    assert "full-backprop" not in box and "truncated-backprop" not in box and box["zeroth-order"].fits


def test_the_measured_ranking_decides_and_falls_through_to_what_fits():
    opts = _options(10 * MB, MB, MB // 10, 20, 8, left=300 * MB, differentiable=True)
    situation, pick, why = choose(opts, differentiable=True, loose=True)
    assert situation == ("differentiable", "loose") and pick.family == RANKINGS[situation].families[0]
    assert RANKINGS[situation].evidence in why
    situation, pick, _ = choose(_options(10 * MB, MB, MB // 10, 20, 8, 300 * MB, False), False, True)
    assert situation[0] == "black-box" and pick.family == RANKINGS[situation].families[0]
    # the first family of the ranking does not fit: the next one that does is chosen
    opts = [o for o in _options(10 * MB, 10 * MB, MB // 10, 20, 8, 25 * MB, True)]
    first = RANKINGS[("differentiable", "tight")].families[0]
    assert not by_family(opts)[first].fits
    _, pick, _ = choose(opts, True, False)
    assert pick is not None and pick.family != first and pick.fits
    _, pick, why = choose([o for o in opts if not o.fits], True, False)
    assert pick is None and "nothing fits" in why


@pytest.mark.parametrize("budget, expect", [("2GB", "--no-gradient-checkpointing"), ("70MB", "--grad-accum")])
def test_plan_recommends_from_measurements_on_a_real_model(capsys, budget, expect):
    from chaintune.cli.main import main

    main(["plan", "--model", "builtin:digits", "--reward", "digit:5", "--memory", budget, "--sample-steps", "20",
          "--batch-size", "32", "--peft", "none"])
    out = capsys.readouterr().out
    rows = {line[:21].strip(): line[21:].strip() for line in out.splitlines() if line[:1] != " "}
    assert rows["situation"].startswith("differentiable reward, " + ("loose" if budget == "2GB" else "tight"))
    assert rows["reward decided"].startswith("early")  # digit identity: the high-noise end (docs/results.md)
    flags = shlex.split(rows["run"].removeprefix("chaintune align "))
    params = typer.main.get_command(app).commands["align"].make_context("align", list(flags)).params
    assert params["estimator"] == "full-backprop" and params["reward"] == "digit:5" and expect in flags
    assert params["batch_size"] * params["grad_accum"] == 32  # the same samples per step as planned


def test_plan_says_when_nothing_fits(capsys):
    from chaintune.plan.recommend import recommend

    with pytest.raises(ChaintuneError, match="below the model's fixed cost"):
        recommend("builtin:digits", "digit:5", "1MB", sample_steps=20, batch_size=32, peft="none", decided=False)
    rec = recommend("builtin:digits", "digit:5", "22MB", sample_steps=20, batch_size=32, peft="none", decided=False)
    assert rec.choice is None and "nothing fits" in rec.why
