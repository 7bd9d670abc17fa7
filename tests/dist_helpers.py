"""Multi-process check used by tests/test_distributed.py: one gradient step on 2 CPU processes (gloo).

Every process builds the same tiny model and the same pre-drawn batch (x_T and all step noise for
``N`` samples, from one seed), takes its own slice of it, computes the full-backprop gradient
(pathwise through every step: deterministic given the noise) in ``micro`` micro-batches, and
averages with :func:`chaintune.run.trainer.reduce_gradients` through a real ``accelerate``
Accelerator. The union of the slices is the whole batch, so the result must equal the one-process
gradient on all ``N`` samples; an AdamW step after it must give the same parameters too. Each rank
also repeats the step with its slice split into two micro-batches (gradient accumulation).
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

import torch

N = 4  # samples in the pre-drawn batch
STEPS = 4  # chain steps


def setup(seed: int = 0):
    """The tiny LoRA model, the full batch's noise, and a differentiable reward (same on every rank)."""
    from chaintune.adapters import apply_lora
    from chaintune.rewards import FunctionReward
    from chaintune.testing import tiny_unet_model

    model = tiny_unet_model(seed=seed)
    apply_lora(model.denoiser, rank=2)
    g = torch.Generator().manual_seed(seed + 1)
    shape = (N, *model.latent_shape)
    x_T = torch.randn(shape, generator=g)
    noises = [torch.randn(shape, generator=g) for _ in range(STEPS)]
    target = torch.linspace(0, 1, model.latent_shape[-1] ** 2).reshape(1, 1, *model.latent_shape[1:])
    reward = FunctionReward(lambda images: -((images - target) ** 2).flatten(1).mean(1), differentiable=True,
                            name="target")
    return model, x_T, noises, reward


def accumulate(model, reward, x_T, noises, idx: list[int], micro: int) -> int:
    """Add -grad of the mean reward over ``idx`` (split into ``micro`` micro-batches, each averaged
    over itself as the estimators do) to ``.grad``; returns the number of micro-batches."""
    from chaintune.estimators import EstimationContext
    from chaintune.estimators.base import rollout

    chunks = [idx[i::micro] for i in range(micro)]
    for chunk in chunks:
        cond = model.default_conditions(len(chunk))
        ctx = EstimationContext(model=model, reward=reward, n=len(chunk), steps=STEPS, eta=1.0,
                                scheduler=model.scheduler, conditions=cond, checkpoint=False)
        _, _, r = rollout(ctx, "pathwise", x_T=x_T[chunk], noises=[z[chunk] for z in noises], cond=cond,
                          grad_reward=True)
        (-r.sum() / len(chunk)).backward()
    return len(chunks)


def one_step(model, params, acc, n_micro: int, lr: float = 1e-2) -> dict:
    """Reduce, record the gradient, take one AdamW step, record the parameters."""
    from chaintune.run.trainer import reduce_gradients

    reduce_gradients(params, acc, n_micro)
    grads = [p.grad.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    opt.step()
    return {"grads": grads, "params": [p.detach().clone() for p in params]}


@contextlib.contextmanager
def noise_from(draw, modules):
    """Within the block, every estimator module in ``modules`` draws its noise with ``draw(ctx, n)``."""
    saved = [m.draw_noise for m in modules]
    for m in modules:
        m.draw_noise = draw
    try:
        yield
    finally:
        for m, f in zip(modules, saved, strict=True):
            m.draw_noise = f


def join_ranks(rank: int, world: int, port: int) -> None:
    """Make a forked child rank ``rank`` of ``world`` (environment of torch.distributed / accelerate, one thread).

    A forked child inherits the parent's accelerate singletons (one process, if it made an Accelerator
    earlier); they are dropped so that this process sees the distributed environment."""
    torch.set_num_threads(1)
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
                       "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                       "HF_HUB_OFFLINE": "1"})
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def worker(rank: int, world: int, port: int, out: str) -> None:
    """One rank: the plain step (one micro-batch of its slice) and the accumulated step (its slice in
    two micro-batches), each from a fresh copy of the same model."""
    from accelerate import Accelerator

    join_ranks(rank, world, port)
    acc = Accelerator(cpu=True)
    assert acc.num_processes == world, f"accelerate sees {acc.num_processes} processes, expected {world}"
    per = N // world
    idx = list(range(rank * per, (rank + 1) * per))
    results = {}
    for micro in (1, 2):
        model, x_T, noises, reward = setup()
        params = [p for p in model.denoiser.parameters() if p.requires_grad]
        n_micro = accumulate(model, reward, x_T, noises, idx, micro)
        results[micro] = one_step(model, params, acc, n_micro)
    if rank == 0:
        torch.save(results, out)
    acc.wait_for_everyone()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def run(out: str | Path, world: int = 2, port: int | None = None, start_method: str = "fork") -> dict:
    """Start ``world`` gloo processes running :func:`worker`; returns rank 0's results by micro-batch count.

    ``fork`` (the default, Linux) reuses this process's imports, which saves ~10 s per process on a
    busy machine; the parent must not hold a process group (it does not: only children init one).
    """
    import socket

    import torch.multiprocessing as mp

    import chaintune.estimators  # noqa: F401  (imported before forking, so children start warm)
    import chaintune.run.trainer  # noqa: F401
    import chaintune.testing  # noqa: F401

    if port is None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
    mp.start_processes(worker, args=(world, port, str(out)), nprocs=world, join=True, start_method=start_method)
    return torch.load(str(out))


if __name__ == "__main__":  # python tests/dist_helpers.py OUT
    res = run(sys.argv[1])
    for micro, r in res.items():
        print(f"micro-batches {micro}: grad norm {float(torch.sqrt(sum((g**2).sum() for g in r['grads']))):.6g}")
