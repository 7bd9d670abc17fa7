"""``chaintune align --pilot``: short probe runs that choose the learning rate (and estimator) on the user's own model
and reward, before the GPU hours of the full run.

Why: chaintune's defaults were measured on the built-in digits; a learning rate that aligns them may hack another
reward in ten steps or not move a larger model at all. Each probe is the full run's configuration for
``--pilot-steps`` (a fifth of ``--steps``, at least 10) at one (estimator, LR), evaluated half-way and at the end on
held-out seeds with the hacking guard on. The pilot keeps the probe with the highest held-out reward (the judge
training never sees; the training reward where a reward has no twin) among those that raised no alarm. Probes
write nothing to disk; what they measured goes into the full run's status file and report.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from collections.abc import Callable

from chaintune.align.config import AlignConfig
from chaintune.errors import ChaintuneError

__all__ = ["Probe", "run_pilot", "choose", "pilot_steps"]


@dataclasses.dataclass
class Probe:
    estimator: str
    lr: float
    score: float  # held-out reward at the probe's end (training reward where there is no held-out one)
    start: float  # the same at step 0
    alarms: list[str]
    seconds: float

    @property
    def usable(self) -> bool:
        return not self.alarms and self.score == self.score  # no alarm, not NaN


def pilot_steps(cfg: AlignConfig) -> int:
    return cfg.pilot.pilot_steps or min(cfg.optim.steps, max(10, cfg.optim.steps // 5))


def _score(metrics: dict) -> float:
    return float(metrics.get("eval/heldout_reward", metrics.get("eval/reward", float("nan"))))


# runs a probe's config without writing anything: (final metrics, step-0 metrics, the hacking alarms' reasons)
Fit = Callable[[AlignConfig], tuple[dict, dict, list[str]]]


def probe(cfg: AlignConfig, estimator: str, lr: float, fit: Fit) -> Probe:
    """One probe run (nothing written to disk)."""
    c = copy.deepcopy(cfg)
    c.estimator.name, c.optim.lr = estimator, lr
    c.optim.steps = pilot_steps(cfg)
    c.eval.eval_every = max(1, c.optim.steps // 2)
    c.eval.final_model = "last"
    c.guards.on_hacking = "warn"  # a probe is judged by its alarms, not rolled back
    c.pilot.pilot = False
    c.run.tensorboard = c.run.report = False
    t0 = time.time()
    final, first, alarms = fit(c)
    return Probe(estimator, lr, _score(final), _score(first), alarms, round(time.time() - t0, 1))


def choose(probes: list[Probe]) -> Probe:
    """The probe with the highest score that raised no alarm."""
    usable = [p for p in probes if p.usable]
    if not usable:
        raise ChaintuneError("every pilot probe raised a hacking alarm or diverged (" + "; ".join(
            f"{p.estimator} lr {p.lr:g}: {p.alarms[0] if p.alarms else 'NaN'}" for p in probes)
            + "); give lower --pilot-lrs")
    return max(usable, key=lambda p: p.score)


def run_pilot(cfg: AlignConfig, fit: Fit, *, log: Callable[[str], None] = print) -> tuple[AlignConfig, dict]:
    """Probe, choose, and return the full run's config (the chosen estimator and LR, ``pilot`` off so that a
    resumed run does not probe again) with the record of the pilot."""
    grid = [(e, lr) for e in cfg.pilot.estimators(cfg.estimator.name) for lr in cfg.pilot.lrs()]
    log(f"pilot: {len(grid)} probes of {pilot_steps(cfg)} steps ({', '.join(f'{e} lr {lr:g}' for e, lr in grid)})")
    probes = []
    for i, (e, lr) in enumerate(grid, 1):
        p = probe(cfg, e, lr, fit)
        probes.append(p)
        log(f"pilot {i}/{len(grid)}: {e} lr {lr:g}: held-out {p.start:.4g} -> {p.score:.4g}"
            + (f"; alarm: {p.alarms[0]}" if p.alarms else "") + f" ({p.seconds:.0f} s)")
    best = choose(probes)
    log(f"pilot: chose {best.estimator} lr {best.lr:g} (held-out {best.score:.4g}); the full run starts")
    full = copy.deepcopy(cfg)
    full.estimator.name, full.optim.lr, full.pilot.pilot = best.estimator, best.lr, False
    record = {"steps": pilot_steps(cfg), "chosen": {"estimator": best.estimator, "lr": best.lr},
              "probes": [dataclasses.asdict(p) for p in probes]}
    return full, record
