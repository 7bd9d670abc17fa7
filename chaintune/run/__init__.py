"""The run skeleton every trainer shares: the :class:`~chaintune.run.trainer.Trainer` runs an objective (align,
transfer, pretrain, controlnet) and owns the run directory, checkpoints, logging, the report and the alarm policy.
It knows no objective: each declares what it needs (:class:`~chaintune.run.trainer.Objective`).

Modules: ``config`` (the shared option sections, torch-free), ``trainer``, ``checkpoint``, ``rundir`` (what a run
directory holds), ``logging``, ``optim``, ``report``.
"""

from chaintune._exports import lazy
from chaintune.run.config import EvalConfig, OptimConfig, RunConfig

__all__ = ["OptimConfig", "EvalConfig", "RunConfig", "Trainer", "Objective", "Evaluation", "RunResult",
           "format_summary", "build_report"]
__getattr__ = lazy(__name__, {"Trainer": "chaintune.run.trainer", "Objective": "chaintune.run.trainer",
                              "Evaluation": "chaintune.run.trainer", "RunResult": "chaintune.run.trainer",
                              "format_summary": "chaintune.run.trainer", "build_report": "chaintune.run.report"})
