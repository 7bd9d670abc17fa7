"""The run skeleton every trainer shares: an objective says what a step computes; this does the rest.

Owned here, once: the run directory and its status file, the resolved config, metrics JSONL and
tensorboard, atomic checkpoints (keep the last K; bit-exact resume), an EMA of the trainable
weights, the non-finite policy (skip and warn; stop after N in a row with the last good
checkpoint intact), accelerate multi-process with an explicit gradient all-reduce, a progress bar
with ETA, evaluation grids, the HTML report and the end-of-run summary.

An :class:`Objective` (``align``, ``transfer``, ``pretrain``) loads and validates what it needs in
``prepare`` (before anything is written), accumulates gradients in ``updates`` and yields once per
optimizer update, and evaluates on held-out seeds in ``evaluate``.

Multi-process: the model is *not* wrapped in DDP (zeroth-order estimators write gradients that
DDP's hooks would not see); gradients are all-reduced explicitly after accumulation, so every
estimator is exact under ``accelerate launch``. Each process draws its own samples.

Sharded (``--fsdp``, ``RunConfig.fsdp``, full fine-tuning only): after the objective's ``prepare`` the
denoiser is sharded with FSDP2 (:func:`chaintune.distributed.shard_model`), so each of N
processes holds 1/N of the weights, gradients, AdamW moments, EMA and best-evaluation weights. The
estimators stay exact (their plans are the first process's, the samples each process's own); the
non-finite check and gradient clipping see the whole gradient; checkpoints and ``best/`` hold full
tensors in the unsharded format and ``model/`` is a plain diffusers model (written from an unsharded
twin on the main process).
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel

from chaintune import distributed
from chaintune.adapters import apply_peft, lora_target_layers
from chaintune.backends.base import DiffusionModel
from chaintune.distributed import full_state_dict, grads_finite, is_sharded, local_shard, unsharded_copy
from chaintune.errors import ChaintuneError
from chaintune.options import flat_values, from_dict, specs, to_dict
from chaintune.run import checkpoint as ckpt
from chaintune.run.compiled import compile_denoiser
from chaintune.run.config import LR_SCHEDULES
from chaintune.run.logging import RunLogger
from chaintune.run.optim import make_optimizer
from chaintune.run.report import build_report
from chaintune.run.rundir import (
    RunLock,
    check_run_dir,
    prepare_run_dir,
    read_run_info,
    save_tuned_model,
    write_run_info,
)
from chaintune.utils.devices import check_device, is_out_of_memory, out_of_memory_error
from chaintune.utils.hub import quiet_hub
from chaintune.utils.images import save_grid
from chaintune.utils.io import atomic_dir
from chaintune.utils.progress import progress
from chaintune.utils.threads import apply_thread_policy

__all__ = ["Evaluation", "Objective", "RunResult", "Trainer", "reduce_gradients", "format_summary"]


@dataclass
class Evaluation:
    """What an evaluation measured, and the samples to show (saved as the step's grid)."""

    metrics: dict[str, float]
    images: torch.Tensor | None = None
    score: float | None = None  # higher is better: which evaluation's weights are the run's best
    alarm: str | None = None  # what looks wrong (reward hacking), for the objective's policy
    captions: list[str] | None = None  # one per video of ``images`` (its prompt), written beside its strip


@dataclass
class RunResult:
    model: DiffusionModel
    out: Path | None
    history: list[dict] = field(default_factory=list)
    final: dict = field(default_factory=dict)
    trainable: list[str] = field(default_factory=list)
    first_eval: dict = field(default_factory=dict)
    name: str = ""
    command: str = ""
    notes: list[str] = field(default_factory=list)  # what the summary must say beyond the metrics (hacking)


@dataclass
class AlarmPolicy:
    """What the run does when an objective's evaluation raises an alarm (:attr:`Evaluation.alarm`).

    ``action``: ``off`` | ``warn`` | ``stop`` (keep the best evaluation) | ``rollback`` (back to the best
    evaluation's weights with half the LR and fresh optimizer moments; ``stop`` after ``max_rollbacks``).
    ``patience``: alarms in a row before it acts (the earlier ones only warn). ``name`` keys the events in the
    run's status file; ``label`` is the words a warning and the summary use ("reward hacking")."""

    action: str = "off"
    patience: int = 1
    max_rollbacks: int = 0
    name: str = "alarms"
    label: str = "alarm"


class Objective:
    """What a trainer supplies to the run skeleton."""

    command = "train"
    model: DiffusionModel
    evaluate_at_start = False  # evaluate the untrained model at step 0 (the "before" of a run)
    progress_key = "loss"  # the training metric shown in the progress bar
    alarm_policy: AlarmPolicy | None = None  # what the run does when an evaluation raises an alarm (None: nothing)
    train_mode = True  # the denoiser's nn.Module mode during updates (dropout, DiT's 10% label drop)

    def fsdp_refusal(self) -> str | None:
        """Why this objective's configuration cannot run sharded (``--fsdp``), or None; asked before any model
        loads, so an impossible combination fails first."""
        return None

    def prepare(self, run: Trainer) -> None:
        """Load and validate everything (model, data, reward, estimator) on ``run.device``; write nothing."""
        raise NotImplementedError

    def updates(self, run: Trainer, step: int) -> Iterator[tuple[int, dict]]:
        """Accumulate -grad into ``.grad`` of the trainable parameters; yield (micro-batches, metrics) once
        per optimizer update (the skeleton averages, checks, clips and steps)."""
        raise NotImplementedError

    def evaluate(self, run: Trainer, step: int) -> Evaluation | None:
        return None

    def export(self) -> DiffusionModel:
        """The model to save (e.g. with adapters folded into plain diffusers modules)."""
        return self.model

    def state_dict(self) -> dict:
        """JSON-able state to checkpoint beyond weights, optimizer and RNGs."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def info(self) -> dict:
        """Extra fields for the run's status file (``base_model`` is what ``load`` needs for adapters)."""
        return {}


def reduce_gradients(params: list[torch.nn.Parameter], acc: Any, n_micro: int) -> None:
    """Average accumulated gradients over micro-batches and processes (explicit all-reduce).

    Every process contributes a gradient for every parameter (zeros where its estimator wrote
    none), so the collective calls match across processes. Sharded parameters (FSDP2 DTensors, see
    :mod:`chaintune.distributed`) already hold the process average of their shard: FSDP
    reduce-scatters (averages) backpropagated gradients and ``Perturbation.accumulate`` averages its
    zeroth-order terms, so they are only divided by ``n_micro`` (an all-reduce would sum different shards).
    """

    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        p.grad.div_(n_micro)
        if acc.num_processes > 1 and not is_sharded(p):
            p.grad.copy_(acc.reduce(p.grad, reduction="mean"))


class Trainer:
    """Runs an :class:`Objective` under a config with ``optim``/``eval``/``run`` sections.

    ``thread_policy`` (default True): on the CPU, torch's intra-op thread count follows
    :mod:`chaintune.utils.threads` (one thread while loading and for small models, the free cores for big
    ones, ``CHAINTUNE_THREADS`` wins). torch's default of a thread per core stalls every op when another
    process holds a core (benchmarks/threads.py: a demo step 10x slower under load). Pass False when the caller
    manages torch's threads itself.
    """

    def __init__(self, cfg: Any, objective: Objective, *, out: str | Path | None = None, overwrite: bool = False,
                 resume: bool = False, show_progress: bool | None = None, name: str | None = None,
                 thread_policy: bool = True):
        self.cfg, self.objective = cfg, objective
        self.out = Path(out) if out is not None else None
        self.overwrite, self.resume = overwrite, resume
        self.show_progress = cfg.run.progress if show_progress is None else show_progress
        self.name = name or (self.out.name if self.out is not None else "") or objective.command
        self.thread_policy = thread_policy
        self.state: dict = {"bad_steps": 0}
        self._status_base: dict = {}
        self.sharded = False  # FSDP2: the denoiser's parameters are DTensors (see _fsdp)
        self._skeleton: torch.nn.Module | None = None  # the unsharded denoiser on the meta device, for export

    # ------------------------------------------------------------------------------ helpers for objectives
    def autocast(self):
        return self.acc.autocast()

    def threads_for(self, model) -> None:
        """Apply the thread rule for ``model`` (unless the caller manages threads). Objectives call it as soon as
        their model is loaded, so that heavy work in ``prepare`` (a knowledge bank) runs under it too."""
        if self.thread_policy and self.device.type == "cpu":
            apply_thread_policy(model)

    def log_line(self, text: str) -> None:
        """A message that does not break the progress bar (main process only)."""
        if self.main:
            from tqdm.auto import tqdm

            tqdm.write(text, file=sys.stderr)

    # ------------------------------------------------------------------------------ the run
    def fit(self) -> RunResult:
        with quiet_hub():  # the run's own progress bar only: no loading/saving bars or warnings of the libraries
            return self._fit()

    def _fit(self) -> RunResult:
        from accelerate import Accelerator

        cfg, obj = self.cfg, self.objective
        cfg.validate()
        if self.resume and self.out is None:
            raise ChaintuneError("resume needs the run directory (out)")
        requested = check_device(cfg.run.device)
        self.acc = Accelerator(mixed_precision=cfg.optim.mixed_precision,
                               cpu=requested is not None and requested.type == "cpu")
        self.device = requested if requested is not None else self.acc.device
        self.main = self.acc.is_main_process
        self.lock = None
        self.bars = self.main and self.show_progress  # progress bars for long phases (bank, evaluation samples)
        torch.manual_seed(cfg.run.seed)
        self.generator = torch.Generator().manual_seed(cfg.run.seed + 1_000_003 * self.acc.process_index)
        try:
            self.sharded = self._fsdp()  # an impossible --fsdp fails before the model loads
            if self.out is not None and self.main:  # before loading anything: the cheapest errors to report

                check_run_dir(self.out, overwrite=self.overwrite, resume=self.resume, inputs=_input_paths(cfg))
                self.lock = RunLock(self.out)
                if self.out.is_dir():
                    self.lock.acquire()  # a second writer stops here, before it loads a model
                if self.resume:
                    check_resume_config(cfg, self.out)
                    check_resumable(cfg, self.out)
            if self.thread_policy and self.device.type == "cpu":
                apply_thread_policy(0)  # loading and probing: small work, one thread until the model is known
            obj.prepare(self)  # every input is validated here; nothing is written before it succeeds
            if cfg.optim.peft == "lora":
                lora_target_layers(obj.model.denoiser, cfg.optim.lora_targets)
            self.threads_for(obj.model)
            if self.out is not None and self.main:
                prepare_run_dir(self.out, overwrite=self.overwrite, resume=self.resume, lock=self.lock)
                if not self.resume or not (self.out / "config.yaml").exists():
                    # the marker first, then the config: a run killed at any moment is recognisably a run, which
                    # --resume (it starts over before its first checkpoint) and --overwrite accept

                    self._status_base = {"command": obj.command, "name": self.name, **obj.info(),
                                         "config": flat_values(cfg)}
                    self._status("starting")
                    ckpt.save_config(self.out, to_dict(cfg))
            self.acc.wait_for_everyone()
            return self._train()
        except KeyboardInterrupt:
            self._status("interrupted")
            raise
        except ChaintuneError as e:
            self._status(f"failed: {e}")
            raise
        except BaseException as e:
            self._status(f"failed: internal error {type(e).__name__}")
            raise
        finally:
            if self.lock is not None:
                self.lock.release()

    def _status(self, status: str, **extra) -> None:
        if self.out is None or not self.main or not self._status_base:
            return

        write_run_info(self.out, {**self._status_base, "status": status, **extra})

    def _train(self) -> RunResult:
        """Set up the optimisation, restore a checkpoint, run the steps, save: what every trainer shares."""
        cfg, obj, out, main = self.cfg, self.objective, self.out, self.main
        self._set_up_optimisation()
        start = self._restore() if self.resume else 0
        self._status_base = {"command": obj.command, "name": self.name, "peft": cfg.optim.peft,
                             "trainable_parameters": sum(p.numel() for p in self.params),
                             "trainable_tensors": len(self.trainable), "compiled": self.compiled, **obj.info(),
                             "config": flat_values(cfg)}
        if out is not None and main:
            ckpt.save_config(out, to_dict(cfg))
            self._status("running")
        self.logger = RunLogger(out, tensorboard=cfg.run.tensorboard) if out is not None and main else None
        result = RunResult(model=obj.model, out=out, trainable=self.trainable, name=self.name, command=obj.command)
        self.best: dict | None = None  # {"step", "score", "metrics", "params"}: the best evaluation's weights
        if self.resume and self.state.get("best") and out is not None and (out / "best").is_dir():
            self.best = self._read_best(out / "best")
        if obj.evaluate_at_start and start == 0:
            result.first_eval = self._evaluate(0)
            self._log(result, {"step": 0, **result.first_eval})
        t0 = time.time()
        row, last_eval, done = self._steps(result, start, t0)
        self.acc.wait_for_everyone()
        if self.ema is not None:
            self.ema.copy_to(self.params)  # the EMA weights are what is saved and returned
        obj.model.denoiser.eval()
        result.final = {"step": done, **{k: v for k, v in row.items() if k != "final"}, **last_eval,
                        "train_seconds": round(time.time() - t0, 2)}
        self._finish(result)
        return result

    def _set_up_optimisation(self) -> None:
        """Adapters, sharding (after adapters, before the optimizer and EMA: they hold the shards), AdamW, the LR
        schedule and the EMA."""
        opt_cfg, den = self.cfg.optim, self.objective.model.denoiser
        # adapters draw their initial weights from the global generator: seeded here, not only at the start, so
        # that they do not depend on what loading drew (a model or reward cached by an earlier run in this process
        # draws nothing, a first load does)
        torch.manual_seed(self.cfg.run.seed)
        self.trainable = apply_peft(den, opt_cfg.peft, rank=opt_cfg.lora_rank, lora_targets=opt_cfg.lora_targets)
        if self.sharded:
            self._skeleton = distributed.meta_copy(den)
            distributed.shard_model(den, distributed.default_mesh(self.device),
                                    min_params=distributed.DEFAULT_MIN_PARAMS)
        self.params = [p for p in den.parameters() if p.requires_grad]
        self.compiled = compile_denoiser(self.objective.model, opt_cfg.compile, batch_size=opt_cfg.batch_size,
                                         autocast=self.autocast, low_precision=opt_cfg.mixed_precision != "no",
                                         warn=self.log_line)
        self.optimizer = make_optimizer(self.params, lr=opt_cfg.lr, weight_decay=opt_cfg.weight_decay,
                                        eight_bit=opt_cfg.eight_bit_adam)
        self.lr_scheduler = get_scheduler(LR_SCHEDULES[opt_cfg.lr_schedule], self.optimizer,
                                          num_warmup_steps=opt_cfg.warmup_steps, num_training_steps=opt_cfg.steps)
        self.ema = EMAModel(self.params, decay=opt_cfg.ema_decay) if opt_cfg.ema_decay > 0 else None

    def _restore(self) -> int:
        """The step to continue from: the newest intact checkpoint's (weights, optimizer, schedule, RNGs, counters,
        the objective's state), or 0 for a run killed before its first one; metrics past it are dropped."""
        out, steps = self.out, self.cfg.optim.steps
        restored = ckpt.restore(out, self.objective.model.denoiser, self.optimizer, self.lr_scheduler, self.generator,
                                self.state, ema=self.ema, warn=self.log_line)
        if restored is None:  # killed before its first checkpoint (check_resumable refused finished runs)
            self.log_line(f"warning: {out} has no checkpoint yet; the run starts over")
        elif restored > steps:
            raise ChaintuneError(f"--resume: the newest checkpoint is at step {restored}, past --steps {steps}")
        self.objective.load_state_dict(self.state.pop("objective", None) or {})
        if self.main:
            ckpt.truncate_metrics(out, restored if restored is not None else -1)
        return restored or 0

    def _log(self, result: RunResult, row: dict) -> None:
        result.history.append(row)
        if self.logger is not None:
            self.logger.log(row)

    def _steps(self, result: RunResult, start: int, t0: float) -> tuple[dict, dict, int]:
        """The training loop: updates, evaluations (and the alarm policy), logging, checkpoints. Returns the last
        step's row, the last evaluation and the step reached."""
        cfg, obj, steps = self.cfg, self.objective, self.cfg.optim.steps
        bar = progress(range(start, steps), desc=f"{obj.command} {self.name}", total=steps, initial=start,
                       disable=not self.bars)
        row: dict = {}
        last_eval: dict = {}
        done = start
        for step in bar:
            row = {**self._update(step), "lr": self.lr_scheduler.get_last_lr()[0], "time": time.time() - t0}
            done = step + 1
            if isinstance(row.get(obj.progress_key), float):
                bar.set_postfix({obj.progress_key: f"{row[obj.progress_key]:.4g}"})
            last = done == steps
            evaluate = last or (cfg.eval.eval_every > 0 and done % cfg.eval.eval_every == 0)
            stop = False
            if evaluate:
                last_eval = self._evaluate(done)
                row.update(last_eval)
                stop = self._act_on_alarm(done)
            if last or evaluate or done % cfg.run.log_every == 0:
                self._log(result, {"step": done, **row, **({"final": True} if last else {})})
            if self.out is not None and cfg.run.save_every and (done % cfg.run.save_every == 0 or last):
                self._checkpoint(done)
            if stop:
                break
        bar.close()
        return row, last_eval, done

    def _update(self, step: int) -> dict:
        """One optimizer step: the objective's micro-batches (and PPO epochs), each update averaged, checked,
        clipped and applied. The allocator failing is the batch being too large for this machine: one input error."""
        opt_cfg = self.cfg.optim
        self.objective.model.denoiser.train(self.objective.train_mode)
        row: dict = {}
        try:
            for n_micro, metrics in self.objective.updates(self, step):
                row.update(metrics)
                row.update(self._apply(n_micro, step))
        except Exception as e:
            if not is_out_of_memory(e):
                raise
            self.optimizer.zero_grad(set_to_none=True)
            raise out_of_memory_error(e, opt_cfg.batch_size, opt_cfg.grad_accum, self.device, step) from None
        return row

    def _checkpoint(self, step: int) -> None:
        """Every process takes part: it gathers RNG streams (and, sharded, full tensors) for the main one to write."""
        self.acc.wait_for_everyone()
        ckpt.save(self.out, step, self.objective.model.denoiser, self.optimizer, self.lr_scheduler, self.generator,
                  {**self.state, "objective": self.objective.state_dict()}, keep=self.cfg.run.keep_checkpoints,
                  ema=self.ema, write=self.main)

    def _finish(self, result: RunResult) -> None:
        """The delivered model (the best evaluation's weights with ``final_model best``), the notes the summary
        must say, ``model/``, the status file and the report."""
        cfg, obj, out = self.cfg, self.objective, self.out
        final_model = "last"
        if cfg.eval.final_model == "best" and self.best is not None and self.best["step"] != result.final["step"]:
            self._load_params(self.best["params"])
            result.final.update(self.best["metrics"], best_step=self.best["step"])
            final_model = f"best (step {self.best['step']})"
        policy = obj.alarm_policy
        events = self.state.get(policy.name, []) if policy is not None else []
        self._status_base.update(final_model=final_model, **({policy.name: events} if policy is not None else {}))
        result.notes = [f"{policy.label} at step {e['step']}: {e['reason']}; {e['action']}" for e in events]
        if final_model != "last":
            result.notes.append(f"model/ holds the {final_model} evaluation (also OUT/best); metrics are its own")
        exported = self._export() if out is not None else None  # sharded: gathered by every process
        if out is not None and self.main:
            save_tuned_model(out, exported, cfg.optim.peft, cfg.optim.lora_rank)
            self._status("finished", final={k: v for k, v in result.final.items() if isinstance(v, (int, float))})
            self.logger.close()
            if cfg.run.report:
                build_report(out)

    def _apply(self, n_micro: int, step: int) -> dict:
        """Average, check, clip and apply one update; a non-finite gradient is skipped (and counted)."""
        params, opt, cfg = self.params, self.optimizer, self.cfg
        reduce_gradients(params, self.acc, n_micro)

        if not grads_finite(params):  # sharded: every process checks its shard and all agree
            self.state["bad_steps"] += 1
            opt.zero_grad(set_to_none=True)
            limit = cfg.run.max_bad_steps
            self.log_line(f"warning: step {step + 1}: non-finite gradient, update skipped "
                          f"({self.state['bad_steps']}/{limit} in a row)")
            if self.state["bad_steps"] >= limit:
                where = f"; the last good checkpoint in {self.out / 'checkpoints'} is intact" if self.out else ""
                raise ChaintuneError(f"{limit} non-finite gradients in a row at step {step + 1}; stopped{where} "
                                     "(lower --lr or check the reward/data)")
            return {"skipped_updates": self.state["bad_steps"]}
        self.state["bad_steps"] = 0
        clip = cfg.optim.max_grad_norm if cfg.optim.max_grad_norm > 0 else math.inf
        gnorm = float(torch.nn.utils.clip_grad_norm_(params, clip))  # sharded: the norm of the whole gradient
        opt.step()
        self.lr_scheduler.step()
        if self.ema is not None:
            self.ema.step(params)
        opt.zero_grad(set_to_none=True)
        return {"grad_norm": gnorm}

    def _fsdp(self) -> bool:
        """Whether to shard the denoiser (``--fsdp`` on several processes); what sharding cannot do is refused
        here, before a model loads."""
        cfg = self.cfg
        if not getattr(cfg.run, "fsdp", False):
            return False
        if cfg.optim.peft != "none":
            raise ChaintuneError(f"--fsdp shards full fine-tuning (--peft none); --peft {cfg.optim.peft} trains few "
                                 "enough weights for plain data parallelism under accelerate launch: drop --fsdp")
        if cfg.optim.eight_bit_adam:
            raise ChaintuneError("--fsdp shards AdamW's states, which bitsandbytes' 8-bit AdamW cannot hold: drop "
                                 "--eight-bit-adam")
        refusal = self.objective.fsdp_refusal()
        if refusal:
            raise ChaintuneError(f"--fsdp: {refusal}")
        if self.acc.num_processes == 1:
            self.log_line("warning: --fsdp with one process: nothing to shard, the run is unsharded (start it "
                          "with accelerate launch --num_processes N to shard it over N processes)")
            return False
        return True

    def _export(self):
        """The objective's model to save, on the main process (None elsewhere). Sharded: every process takes
        part in gathering the full weights, and the main process gets an unsharded twin of the denoiser."""
        obj = self.objective
        if not self.sharded:
            return obj.export() if self.main else None

        den = obj.model.denoiser
        state = full_state_dict(den)  # rank 0 (the main process) only
        if not self.main:
            return None
        model = obj.export()
        if model.denoiser is not den:
            raise ChaintuneError(f"--fsdp: {obj.command} exports a transformed denoiser, which a sharded run "
                                 "cannot write")
        return model.with_denoiser(unsharded_copy(self._skeleton, state))

    def _load_params(self, values: list[torch.Tensor]) -> None:
        """Load weights kept by :meth:`_keep_best` (each process's shard when sharded)."""

        with torch.no_grad():
            for p, v in zip(self.params, values, strict=True):
                target = p.to_local() if is_sharded(p) else p
                target.copy_(v.to(target.device, target.dtype))

    def _keep_best(self, step: int, ev: Evaluation) -> None:
        """Remember the best evaluation's weights (they are what was evaluated: the EMA's when there is one) and
        write them as OUT/best, a model id. Sharded: each process keeps its shard; every process takes part in
        gathering the full weights the main process writes."""

        self.best = {"step": step, "score": ev.score, "metrics": dict(ev.metrics),
                     "params": [(p.to_local() if is_sharded(p) else p).detach().to("cpu", copy=True)
                                for p in self.params]}
        self.state["best"] = {"step": step, "score": ev.score}
        if self.out is None:
            return
        exported = self._export()  # sharded: gathered by every process
        if not self.main:
            return
        from safetensors.torch import save_file

        names = [n for n, p in self.objective.model.denoiser.named_parameters() if p.requires_grad]
        full = self.best["params"]
        if self.sharded:  # the full weights: the unsharded twin's (already gathered)
            twin = dict(exported.denoiser.named_parameters())
            full = [twin[n].detach() for n in names]
        with atomic_dir(self.out / "best") as tmp:
            save_tuned_model(tmp, exported, self.cfg.optim.peft, self.cfg.optim.lora_rank)
            save_file({n: t.contiguous() for n, t in zip(names, full, strict=True)},
                      str(tmp / "trainable.safetensors"))  # what a resumed run rolls back to
            write_run_info(tmp, {"command": self.objective.command, "status": f"best evaluation (step {step})",
                                 "step": step, "score": ev.score, **self.objective.info(),
                                 "peft": self.cfg.optim.peft, "metrics": ev.metrics})

    def _read_best(self, path: Path) -> dict | None:
        """The best evaluation kept in OUT/best, for a resumed run (None if unreadable: it is then re-found)."""
        from safetensors.torch import load_file

        try:
            weights, info = load_file(str(path / "trainable.safetensors")), read_run_info(path)
            named = [(n, p) for n, p in self.objective.model.denoiser.named_parameters() if p.requires_grad]
            return {"step": info["step"], "score": info["score"], "metrics": info.get("metrics", {}),
                    "params": [local_shard(weights[n], p).to_local().cpu() if is_sharded(p) else weights[n]
                               for n, p in named]}  # sharded: this process's shard, as _keep_best keeps it
        except (ChaintuneError, OSError, KeyError):
            return None

    def _act_on_alarm(self, step: int) -> bool:
        """Apply the objective's :class:`AlarmPolicy` to the last evaluation's alarm; True when the run must stop."""
        ev, policy = self._last_evaluation, self.objective.alarm_policy
        if ev is None or policy is None or policy.action == "off":
            return False
        self.state["alarm_streak"] = self.state.get("alarm_streak", 0) + 1 if ev.alarm is not None else 0
        if ev.alarm is None:
            return False
        rollbacks, streak = self.state.get("rollbacks", 0), self.state["alarm_streak"]
        if policy.action == "warn":
            action = "warned"
        elif streak < policy.patience:  # a short excursion that often recovers (benchmarks/guard.py): watch it
            action = f"watching: acts after {policy.patience} alarms in a row (this is {streak})"
        elif policy.action == "rollback" and self.best is not None and rollbacks < policy.max_rollbacks:
            self._roll_back(lr_factor=0.5)
            self.state["rollbacks"], self.state["alarm_streak"] = rollbacks + 1, 0
            action = f"rolled back to the best evaluation (step {self.best['step']}) with half the LR"
        else:
            action = "stopped" + (f"; the best evaluation (step {self.best['step']}) is kept" if self.best else "")
        self.state.setdefault(policy.name, []).append({"step": step, "reason": ev.alarm, "action": action})
        self.log_line(f"warning: step {step}: {policy.label}? {ev.alarm}; {action}")
        return action.startswith("stopped")

    def _roll_back(self, lr_factor: float) -> None:
        """Back to the best evaluation's weights, with fresh optimizer moments (they carry the direction that set
        off the alarm) and the LR scaled by ``lr_factor``."""
        self._load_params(self.best["params"])
        self.optimizer.state.clear()
        for group in self.optimizer.param_groups:
            group["lr"] *= lr_factor
        self.lr_scheduler.base_lrs = [lr * lr_factor for lr in self.lr_scheduler.base_lrs]

    @contextlib.contextmanager
    def _ema_weights(self):
        if self.ema is None:
            yield
            return
        if self.sharded:  # the shards stay where they are (EMAModel.store would move DTensors to the CPU)
            saved = [p.detach().clone() for p in self.params]
            self.ema.copy_to(self.params)
            try:
                yield
            finally:
                with torch.no_grad():
                    for p, v in zip(self.params, saved, strict=True):
                        p.copy_(v)
            return
        self.ema.store(self.params)
        self.ema.copy_to(self.params)
        try:
            yield
        finally:
            self.ema.restore(self.params)

    def _agreed(self, ev: Evaluation | None) -> Evaluation | None:
        """With several processes, every one acts on the main process's verdict (score, alarm): keeping the best
        weights (a collective when sharded) and the hacking policy must not hinge on rounding differences."""
        if ev is None or self.acc.num_processes == 1:
            return ev
        box = [(ev.score, ev.alarm)]
        torch.distributed.broadcast_object_list(box, src=0)
        ev.score, ev.alarm = box[0]
        return ev

    def _evaluate(self, step: int) -> dict:
        den = self.objective.model.denoiser
        with self._ema_weights():
            den.eval()
            # on a forked generator: what evaluation draws (and the first load of a judge) leaves training's random
            # numbers as they were, so a run's updates do not depend on how often, or whether, it is evaluated
            cuda = [self.device.index or 0] if self.device.type == "cuda" else []
            try:
                with torch.random.fork_rng(devices=cuda):
                    ev = self._agreed(self.objective.evaluate(self, step))
                self._last_evaluation = ev
                if ev is not None and ev.alarm is None and ev.score is not None and (
                        self.best is None or ev.score > self.best["score"]):
                    self._keep_best(step, ev)
            finally:
                den.train(self.objective.train_mode)
        if ev is None:
            return {}
        if ev.images is not None and self.out is not None and self.main:
            save_grid(ev.images, self.out / "samples" / f"step_{step:06d}.png", captions=ev.captions)
        return dict(ev.metrics)


def _input_paths(cfg: Any) -> tuple[str, ...]:
    """Every option value that names an existing file or folder (the model, data, prompt file, bank cache):
    what the run reads, so what its ``--out`` must not hold when it is overwritten or resumed."""
    values = [v for k, v in flat_values(cfg).items() if k != "out"]
    names = [x for v in values for x in (v if isinstance(v, (list, tuple)) else [v]) if isinstance(x, str) and x]
    return tuple(x for x in names if _exists(x))


def _exists(name: str) -> bool:
    try:
        return Path(name).exists()
    except (OSError, ValueError):  # a prompt too long for a file name, a NUL byte
        return False


def check_resumable(cfg: Any, out: Path) -> None:
    """A finished run is never restarted by ``--resume``: it needs a checkpoint to continue from and more
    ``--steps`` than it ran (a finished run without one keeps its model; train further from it with --model)."""

    try:
        info = read_run_info(out)
    except ChaintuneError:
        return  # no marker yet (killed before it was written): nothing finished, nothing to keep
    if info.get("status") != "finished":
        return
    done = (info.get("final") or {}).get("step")
    newest = ckpt.latest(out)
    if newest is None:
        raise ChaintuneError(f"--resume: {out} finished{f' at step {done}' if done is not None else ''} and has no "
                             f"checkpoint to continue from (--save-every 0); its model stays as it is. To train "
                             f"further, start a new run from it: --model {out} --out NEW")
    step = int(newest.name.removeprefix("step_"))
    if cfg.optim.steps <= step:
        raise ChaintuneError(f"--resume: {out} already finished at step {step}; nothing to resume (raise --steps "
                             f"above {step} to train it further)")


def check_resume_config(cfg: Any, out: Path) -> None:
    """Refuse a resume whose options differ from what the run ran with, except the ones declared resumable.

    The reference is the config recorded in the run's status file (what the checkpoints were made
    with), so an edited ``config.yaml`` is caught too."""

    try:
        recorded = read_run_info(out).get("config")
    except ChaintuneError:
        recorded = None  # killed before its marker was written (check_run_dir let only such a folder through)
    if not isinstance(recorded, dict):
        return  # killed before it recorded its config: nothing to compare with, the run starts over
    try:
        saved = flat_values(from_dict(type(cfg), recorded, "recorded option"))
    except ChaintuneError as e:
        raise ChaintuneError(f"--resume: the config recorded in {out} does not fit this command: "
                             f"{' '.join(str(e).split())}") from None
    now = flat_values(cfg)
    may_change = {s.name for s in specs(cfg) if s.resumable}  # declared with the options (option(resumable=True))
    changed = [k for k in now if k not in may_change and now[k] != saved.get(k)]
    if changed:
        diff = ", ".join(f"{k}: {saved.get(k)!r} -> {now[k]!r}" for k in changed[:4])
        raise ChaintuneError(f"--resume continues the run as it was configured; changed: {diff}. Only "
                             f"{', '.join(sorted(may_change - {'out'}))} may change (start a new run instead)")


def format_summary(result: RunResult) -> str:
    """The lines a run ends with: what its evaluation measured (start -> end) and where it is."""
    first, final = result.first_eval, result.final
    keys = [k for k, v in final.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
            and (k.startswith("eval/") or k in ("fid", "kid"))]
    head = f"{result.command} {result.name}: {final.get('step', 0)} steps in {final.get('train_seconds', 0):.0f} s"
    lines = [head]
    for k in keys:
        before = f"{first[k]:.4g} -> " if isinstance(first.get(k), (int, float)) else ""
        lines.append(f"  {k.removeprefix('eval/'):<16} {before}{final[k]:.4g}")
    if len(lines) == 1 and isinstance(final.get("loss"), (int, float)):
        lines.append(f"  {'loss':<16} {final['loss']:.4g}")
    lines += [f"  note: {n}" for n in result.notes]
    if result.out is not None:
        how = f"--controlnet {result.out} --condition IMG" if result.model.needs_control else f"--model {result.out}"
        lines.append(f"  run: {result.out}  (report: {result.out / 'report.html'}; sample: chaintune sample {how})")
    return "\n".join(lines)
