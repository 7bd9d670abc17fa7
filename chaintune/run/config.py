"""Config sections every trainer shares: optimisation, evaluation and the run itself.

A trainer's config (``AlignConfig``, ``TransferConfig``, ``PretrainConfig``, ``ControlNetConfig``) embeds these with
its own defaults (``section(OptimConfig, lr=1e-4)``); see :mod:`chaintune.options` for how they become CLI flags
and config-file keys. Torch-free.
"""

from __future__ import annotations

from dataclasses import dataclass

from chaintune.options import option
from chaintune.utils.adapter_names import LORA_TARGET_SETS, PEFT_METHODS, parse_lora_targets

# our names -> diffusers.optimization.get_scheduler's (all with linear warm-up over warmup_steps)
LR_SCHEDULES = {"constant": "constant_with_warmup", "cosine": "cosine", "linear": "linear"}
MIXED_PRECISION = ("no", "fp16", "bf16")
COMPILE_BACKENDS = ("none", "inductor", "aot_eager", "cudagraphs")  # torch.compile backends --compile takes


@dataclass
class OptimConfig:
    """What is trained and how: steps, batch, AdamW, LR schedule, EMA, PEFT, precision, memory."""

    steps: int = option(100, "Optimizer steps.", min=1, resumable=True)
    batch_size: int = option(32, "Samples per micro-batch.", min=1)
    grad_accum: int = option(1, "Micro-batches per optimizer step (gradients are averaged).", min=1)
    lr: float = option(3e-4, "AdamW learning rate.", gt=0)
    lr_schedule: str = option("constant", "LR after warm-up: constant | cosine | linear (both decay to 0 at the "
                              "last step).", choices=tuple(LR_SCHEDULES))
    warmup_steps: int = option(0, "Linear LR warm-up steps.", min=0)
    weight_decay: float = option(0.0, "AdamW weight decay.", min=0)
    max_grad_norm: float = option(1.0, "Clip the gradient to this norm (0: no clipping).", min=0)
    ema_decay: float = option(0.0, "Decay of an EMA of the trainable weights, which is then what is evaluated "
                              "and saved (0: no EMA).", min=0, max=1)
    peft: str = option("none", "Which weights train: none (all) | lora | bitfit | difffit.", choices=PEFT_METHODS)
    lora_rank: int = option(4, "LoRA rank.", min=1)
    lora_targets: str = option("attention", f"Layers LoRA adapts: {' | '.join(LORA_TARGET_SETS)} (also the "
                               "feed-forward layers) | a comma list of layer names or name endings (peft's "
                               "target_modules, e.g. to_q,to_v,ff.net.2).", parse=parse_lora_targets)
    mixed_precision: str = option("no", "no | fp16 | bf16 (autocast; adapters and optimizer state stay fp32).",
                                  choices=MIXED_PRECISION)
    gradient_checkpointing: bool = option(True, "Recompute activations in backward to save memory.")
    compile: str = option("none", "torch.compile the denoiser with this backend: none | inductor (generated "
                          "kernels: for GPUs) | aot_eager (traced only: for finding compiler bugs) | cudagraphs. Its "
                          "gradients are checked against eager's on the run's first batch shape; where they differ "
                          "the run stays eager (a warning says so). Measured on CPU: at parity with eager "
                          "(docs/results.md, Compile).", choices=COMPILE_BACKENDS)
    eight_bit_adam: bool = option(False, "bitsandbytes 8-bit AdamW (CUDA only; falls back to AdamW with a "
                                  "warning).")


@dataclass
class EvalConfig:
    """When and how much to evaluate (held-out seeds; a sample grid each time)."""

    eval_every: int = option(25, "Evaluate every N steps (0: only at the end).", min=0, resumable=True)
    eval_samples: int = option(64, "Samples per evaluation.", min=1, resumable=True)
    final_model: str = option("last", "Which weights the run saves as model/: last (the last step's) | best (the "
                              "evaluation with the best held-out score; also kept as OUT/best, a model id).",
                              choices=("last", "best"))


@dataclass
class RunConfig:
    """The run directory and its bookkeeping: seed, device, logging, checkpoints, failure policy."""

    out: str = option("runs/run", "Run directory (it becomes a model id).", resumable=True)
    seed: int = option(0, "Random seed.", min=0)
    device: str | None = option(None, "cpu, cuda, cuda:1, ... (default: the best available).", resumable=True)
    log_every: int = option(1, "Log training metrics every N steps.", min=1, resumable=True)
    save_every: int = option(50, "Write a resumable checkpoint every N steps and at the end (0: none).", min=0,
                             resumable=True)
    keep_checkpoints: int = option(2, "Checkpoints kept (the newest).", min=1, resumable=True)
    max_bad_steps: int = option(5, "Skip a non-finite update with a warning; stop after this many in a row.",
                                min=1, resumable=True)
    tensorboard: bool = option(True, "Write tensorboard logs under OUT/tb (when tensorboard is installed).",
                               resumable=True)
    progress: bool = option(True, "Show a progress bar with ETA and the current loss/reward.", resumable=True)
    report: bool = option(True, "Write OUT/report.html at the end (config, metric curves, sample grids).",
                          resumable=True)
    fsdp: bool = option(False, "Full fine-tuning sharded over the processes of `accelerate launch` (FSDP2): each "
                        "of N processes holds 1/N of the weights, gradients and AdamW state; only with --peft none "
                        "(one process: no sharding).", resumable=True)  # checkpoints hold full tensors either way


@dataclass
class PilotConfig:
    """``--pilot``: short probe runs that choose the settings before the full run (:mod:`chaintune.run.pilot`)."""

    pilot: bool = option(False, "Before the run, probe each point of the pilot's grid (--pilot-lrs x the trainer's "
                         "other pilot choices) for --pilot-steps on held-out data, keep the best, and run the full "
                         "job with it (the probes go into the run's status file and report).")
    pilot_lrs: str = option("3e-5,1e-4,3e-4", "Learning rates the pilot probes (comma-separated).")
    pilot_steps: int = option(0, "Steps of each probe (0: a fifth of --steps, at least 10).", min=0)
