"""``align --fsdp`` through the run skeleton: full fine-tuning sharded over 2 gloo processes ends with the weights
of 1 unsharded process on the union of their batches (RLR with zeroth-order terms and an EMA, full backprop), writes
the same checkpoints (full tensors), OUT/model (a plain diffusers model) and OUT/best, and resumes bit-exactly.

Each process samples its own half of the union: the estimators' noise comes from a pool indexed by (draw, sample),
where the draw is numbered by the first process's generator and the sample by the process's place in the union, so
the two halves are exactly the one-process batch. The plans (RLR's span, the perturbation seed) are the first
process's, which draws them as the one process does.
"""

from __future__ import annotations

import contextlib
import socket
from pathlib import Path

import pytest
import torch
from dist_helpers import join_ranks, noise_from
from safetensors.torch import load_file

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(), reason="needs the gloo backend")

N = 4  # samples per optimizer step in all (the union batch)
MIN_PARAMS = 5_000  # FSDP unit size for the 42k-parameter tiny UNet: its blocks become units of their own, as
# FLUX's transformer blocks do at the default 50M
STEPS = 3  # optimizer steps
LR = 1e-3
REWARD = f"{Path(__file__).stem}:target_reward"
CASES = {  # name -> options; rlr-zo also keeps an EMA of the weights
    "rlr-zo": {"estimator": "rlr", "h": 1, "zo": True, "sigma": 0.1, "baseline": "none", "ema_decay": 0.5},
    "full-backprop": {"estimator": "full-backprop"},
}


# DDPO's per-prompt stat tracker (updated once per step with every process's and micro-batch's rewards, as
# ddpo-pytorch updates it once per epoch batch) and GRPO (Flow-GRPO's groups and global std over the gathered batch)
STEP_BATCH = {
    "ddpo-tracker": {"estimator": "reinforce", "baseline": "tracker", "tracker_buffer": 16, "tracker_min_count": 4},
    "grpo": {"estimator": "grpo", "group_size": 1},
}


def target_reward(images: torch.Tensor) -> torch.Tensor:
    """x100: gradients well above AdamW's eps (1e-8), whose normalised step would otherwise turn the rounding
    differences of tiny gradient entries (summed in another order when sharded) into visible weight differences."""
    target = torch.linspace(-1, 1, images[0].numel()).reshape(images[0].shape)
    return -100 * ((images - target) ** 2).flatten(1).mean(1)


target_reward.differentiable = True


def _config(model_dir: Path, out: Path, case: str, world: int, **over):
    from chaintune.align.config import AlignConfig

    values = {"model": str(model_dir), "reward": REWARD, "steps": STEPS, "batch_size": N // world, "sample_steps": 4,
              "eta": 1.0, "lr": LR, "lr_schedule": "constant", "eval_every": 0, "eval_samples": 4,
              "kl_weight": 0.0, "on_hacking": "off", "heldout_reward": "", "final_model": "last", "peft": "none",
              "out": str(out), "save_every": 1, "keep_checkpoints": 5, "tensorboard": False, "progress": False,
              "report": False, "device": "cpu", "fsdp": world > 1, "max_grad_norm": 0.0,
              **{**CASES, **STEP_BATCH}[case], **over}
    return AlignConfig.from_dict(values)


@contextlib.contextmanager
def _pooled_noise():
    """Estimators draw x_T and the step noise of sample i of draw k from a generator seeded with (k, i): k from
    the first process's generator (broadcast), i = process rank * n + position, so 2 processes of n samples
    draw the one process's 2n. Consumes one number of the generator, as the one process does."""
    import chaintune.estimators.base as base
    import chaintune.estimators.full as full
    import chaintune.estimators.reinforce as reinforce
    import chaintune.estimators.rlr as rlr
    import chaintune.estimators.truncated as truncated

    dist = torch.distributed

    def draw(ctx, n):
        k = torch.randint(0, 2**20, (1,), generator=ctx.generator)
        rank = 0
        if dist.is_initialized():
            dist.broadcast(k, src=0)
            rank = dist.get_rank()
        shape = (1, *ctx.model.latent_shape)
        xs, zs = [], []
        for i in range(rank * n, rank * n + n):
            g = torch.Generator().manual_seed(int(k) * 64 + i)
            xs.append(torch.randn(shape, generator=g))
            zs.append([torch.randn(shape, generator=g) for _ in range(ctx.steps)])
        return torch.cat(xs), [torch.cat([z[s] for z in zs]) for s in range(ctx.steps)]

    with noise_from(draw, (base, full, reinforce, rlr, truncated)):
        yield


def _worker(rank: int, world: int, port: int, jobs: list, report: str) -> None:
    from torch.distributed.fsdp import FSDPModule

    from chaintune import distributed
    from chaintune.align import align_run

    join_ranks(rank, world, port)
    distributed.DEFAULT_MIN_PARAMS = MIN_PARAMS
    seen = []
    with _pooled_noise():
        for cfg, resume in jobs:
            result = align_run(cfg, resume=resume, show_progress=False)
            den = result.model.denoiser
            params = list(den.parameters())
            seen.append({"steps": [row["step"] for row in result.history],
                         "units": sum(isinstance(m, FSDPModule) for m in den.modules()),
                         "split": sum(p.to_local().numel() < p.numel() for p in params if distributed.is_sharded(p)),
                         "params": len(params)})
    if rank == 0:
        torch.save(seen, report)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def _launch(jobs: list, report: Path, world: int = 2) -> list[dict]:
    import torch.multiprocessing as mp

    import chaintune.align.objective  # noqa: F401
    import chaintune.estimators  # noqa: F401  (imported before forking, so children start warm)

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_worker, args=(world, port, jobs, str(report)), nprocs=world, join=True, start_method="fork")
    return torch.load(str(report))


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    from chaintune.align import align_run
    from chaintune.testing import tiny_unet_model

    root = tmp_path_factory.mktemp("fsdp_trainer")
    model_dir = root / "tiny"
    tiny_unet_model(seed=0).save(model_dir)
    dirs = {f"{case}/{kind}": root / f"{case}-{kind}" for case in CASES for kind in ("sharded", "ref")}
    dirs["rlr-zo/cut"], dirs["base"] = root / "rlr-zo-cut", model_dir
    jobs = [(_config(model_dir, dirs[f"{c}/sharded"], c, 2), False) for c in CASES]
    # stopped after 2 of the 3 steps (the LR is constant), then resumed to 3
    jobs += [(_config(model_dir, dirs["rlr-zo/cut"], "rlr-zo", 2, steps=2), False),
             (_config(model_dir, dirs["rlr-zo/cut"], "rlr-zo", 2), True)]
    # and plain (unsharded) data parallelism through the same skeleton
    dirs["full-backprop/ddp"] = root / "full-backprop-ddp"
    jobs.append((_config(model_dir, dirs["full-backprop/ddp"], "full-backprop", 2, fsdp=False), False))
    # estimators whose advantages are formed over the whole step: 2 processes x 2 micro-batches each
    for case in STEP_BATCH:
        dirs[f"{case}/ddp"], dirs[f"{case}/ref"] = root / f"{case}-ddp", root / f"{case}-ref"
        jobs.append((_config(model_dir, dirs[f"{case}/ddp"], case, 2, fsdp=False, grad_accum=2), False))
    dirs["seen"] = _launch(jobs, root / "seen.pt")
    with _pooled_noise():
        for c in CASES:
            align_run(_config(model_dir, dirs[f"{c}/ref"], c, 1), show_progress=False)
        for c in STEP_BATCH:  # one process, 2 micro-batches of the union's halves
            align_run(_config(model_dir, dirs[f"{c}/ref"], c, 1, grad_accum=2), show_progress=False)
    return dirs


def _unet(run: Path, sub: str = "model") -> dict[str, torch.Tensor]:
    return load_file(str(run / sub / "unet" / "diffusion_pytorch_model.safetensors"))


def _assert_close(got: dict, ref: dict, what: str, exact: bool = False) -> None:
    """Equal up to float32 rounding (atol: relative to the largest entry), or bit for bit."""
    assert got.keys() == ref.keys(), what
    scale = max(float(v.abs().max()) for v in ref.values() if v.numel())
    for k, v in ref.items():
        # to_k.bias: shifts every attention score of a query alike, which softmax ignores; its gradient is
        # rounding noise (different in the sharded sum), which AdamW's normalised step turns into +-lr a step
        tol = dict(rtol=0, atol=0) if exact else (dict(rtol=0, atol=2 * STEPS * LR) if k.endswith("to_k.bias")
                                                  else dict(rtol=1e-5, atol=1e-6 * scale))
        torch.testing.assert_close(got[k], v, **tol, msg=f"{what}: {k}")


def test_the_sharded_runs_were_sharded(runs):
    *sharded, ddp = runs["seen"][: len(runs["seen"]) - len(STEP_BATCH)]
    for seen in sharded:
        assert seen["units"] > 3  # the root and the UNet's blocks
        assert seen["split"] > 0.9 * seen["params"]  # (nearly) every parameter is split across the 2 processes
    assert ddp["units"] == ddp["split"] == 0


@pytest.mark.parametrize("case", list(CASES))
def test_sharded_run_equals_one_unsharded_process_on_the_union(runs, case):
    from diffusers import UNet2DModel

    from chaintune.align import read_metrics

    sharded, ref = runs[f"{case}/sharded"], runs[f"{case}/ref"]
    # the whole gradient's norm (clip_grad_norm_ over the shards), step by step
    norms = [[row["grad_norm"] for row in read_metrics(r) if "grad_norm" in row] for r in (sharded, ref)]
    assert len(norms[0]) == STEPS
    torch.testing.assert_close(torch.tensor(norms[0]), torch.tensor(norms[1]), rtol=1e-5, atol=0)
    # the final evaluation (of the EMA's weights, for rlr-zo) sampled the same images
    evals = [[row["eval/reward"] for row in read_metrics(r) if "eval/reward" in row] for r in (sharded, ref)]
    assert len(evals[0]) == 2  # step 0 and the last
    torch.testing.assert_close(torch.tensor(evals[0]), torch.tensor(evals[1]), rtol=1e-5, atol=0)
    got, want = _unet(sharded), _unet(ref)
    _assert_close(got, want, f"{case} model/")
    base = _unet(runs["base"], ".")
    moved = max(float((want[k] - base[k]).abs().max()) for k in want)
    assert moved > 1e-3, "the run did not train: the equality has no teeth"
    # model/ is a plain diffusers model (the sharded run wrote it from an unsharded twin)
    unet = UNet2DModel.from_pretrained(str(sharded / "model"), subfolder="unet")
    assert type(unet) is UNet2DModel
    for k, p in unet.state_dict().items():
        torch.testing.assert_close(p, got[k], rtol=0, atol=0)
    # checkpoints: full tensors in the unsharded format (weights, AdamW moments, EMA)
    last = f"checkpoints/step_{STEPS:06d}"
    names = ("trainable", "optimizer") + (("ema",) if "ema_decay" in CASES[case] else ())
    for name in names:
        g, w = (load_file(str(r / last / f"{name}.safetensors")) for r in (sharded, ref))
        _assert_close(g, w, f"{case} {name}")
    rng = load_file(str(sharded / last / "rng.safetensors"))
    assert {"generator.0", "generator.1"} <= rng.keys()  # each process's own sample stream
    assert not torch.equal(rng["generator.0"], rng["generator.1"])
    # best/: the step-0 evaluation at least, full tensors
    b_got, b_want = (load_file(str(r / "best" / "trainable.safetensors")) for r in (sharded, ref))
    _assert_close(b_got, b_want, f"{case} best/")
    _assert_close(_unet(sharded, "best/model"), _unet(ref, "best/model"), f"{case} best/model")


def test_ema_is_what_the_sharded_run_exports(runs):
    """With an EMA the saved model is the EMA's weights (each process averaged its shard)."""
    from chaintune.testing import tiny_unet

    sharded = runs["rlr-zo/sharded"]
    ema = load_file(str(sharded / f"checkpoints/step_{STEPS:06d}/ema.safetensors"))
    weights = load_file(str(sharded / f"checkpoints/step_{STEPS:06d}/trainable.safetensors"))
    model = _unet(sharded)
    for i, (k, _) in enumerate(tiny_unet().named_parameters()):  # ema.i: the i-th trainable parameter
        torch.testing.assert_close(model[k], ema[f"ema.{i}"], rtol=0, atol=0, msg=k)
    assert any(not torch.equal(model[k], weights[k]) for k in weights)


def test_unsharded_processes_equal_the_union_too(runs):
    """The same 2 processes without --fsdp (gradients all-reduced): the same weights, each process its own RNG."""
    ddp, ref = runs["full-backprop/ddp"], runs["full-backprop/ref"]
    _assert_close(_unet(ddp), _unet(ref), "ddp model/")
    rng = load_file(str(ddp / f"checkpoints/step_{STEPS:06d}/rng.safetensors"))
    assert not torch.equal(rng["generator.0"], rng["generator.1"])


def test_sharded_resume_is_bit_exact(runs):
    assert runs["seen"][len(CASES) + 1]["steps"] == [STEPS]  # the resumed cut run ran only the last step
    full, cut = runs["rlr-zo/sharded"], runs["rlr-zo/cut"]
    last = f"checkpoints/step_{STEPS:06d}"
    for name in ("trainable", "optimizer", "ema", "rng"):
        _assert_close(load_file(str(cut / last / f"{name}.safetensors")),
                      load_file(str(full / last / f"{name}.safetensors")), f"resumed {name}", exact=True)
    _assert_close(_unet(cut), _unet(full), "resumed model/", exact=True)


@pytest.mark.parametrize("over, message", [
    ({"peft": "lora"}, "--fsdp shards full fine-tuning"),
    ({"kl_weight": 0.01}, "the KL guard draws its chain position on each process"),
    ({"estimator": "rlr", "j": "grad-norm"}, "--j grad-norm measures each span's gradient"),
    ({}, None),  # one process: nothing to shard, a warning and an unsharded run
])
def test_fsdp_is_checked_before_the_model_loads(tmp_path, monkeypatch, capsys, over, message):
    import chaintune
    from chaintune.align import align_run
    from chaintune.errors import ChaintuneError

    class Loaded(Exception):
        pass

    def no_load(*a, **k):
        raise Loaded

    monkeypatch.setattr(chaintune, "load", no_load)
    cfg = _config(tmp_path / "none", tmp_path / "run", "full-backprop", 1, fsdp=True, **over)
    with pytest.raises(Loaded if message is None else ChaintuneError, match=message):
        align_run(cfg, show_progress=False)
    if message is None:
        assert "--fsdp with one process: nothing to shard" in capsys.readouterr().err


@pytest.mark.parametrize("case", list(STEP_BATCH))
def test_step_batch_advantages_over_processes_and_micro_batches_equal_one_process(runs, case):
    """2 processes with --grad-accum 2 end with the weights of 1 process on the union (also 2 micro-batches): the
    tracker is updated once a step with all 8 rewards, GRPO normalises over all 8, in every process alike."""
    from chaintune.align import read_metrics

    ddp, ref = runs[f"{case}/ddp"], runs[f"{case}/ref"]
    norms = [[row["grad_norm"] for row in read_metrics(r) if "grad_norm" in row] for r in (ddp, ref)]
    assert len(norms[0]) == STEPS and all(n > 0 for n in norms[1])
    torch.testing.assert_close(torch.tensor(norms[0]), torch.tensor(norms[1]), rtol=1e-5, atol=0)
    want = _unet(ref)
    _assert_close(_unet(ddp), want, f"{case} model/")
    base = _unet(runs["base"], ".")
    assert max(float((want[k] - base[k]).abs().max()) for k in want) > 1e-4, "the run did not train"
