"""FSDP2 (sharded parameters and gradients) is exact: 2 gloo processes, each holding half of every parameter
and gradient, equal 1 unsharded process on the union of their batches, for full-backprop, reinforce,
zeroth-order and RLR with zeroth-order terms (gradients and the AdamW step after them); full state dicts
gather and scatter the sharded model and optimizer.

Every run draws its sampling noise from one pre-drawn pool (as tests/dist_helpers.py) and its plan (RLR's
span, the perturbation seed) from the same generator seed, so the union and the halves see the same samples;
with a generator per process, the plan is rank 0's (``chaintune.distributed.shared_plan``).
"""

from __future__ import annotations

import contextlib
import socket
from types import SimpleNamespace

import pytest
import torch
from dist_helpers import join_ranks, noise_from

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(), reason="needs the gloo backend")

N = 4  # samples in the pre-drawn pool (the union batch)
STEPS = 4  # chain steps
MIN_PARAMS = 5_000  # shard unit size for the 42k-parameter tiny UNet: down/mid/up blocks become their own units
# name -> (estimator options, context options, mirrored (ZO pairs: draws n/2 samples), micro-batches per rank)
CASES = {
    "full-backprop": ({}, {}, False, 2),
    "reinforce": ({"normalize_advantages": False}, {"baseline": "none"}, False, 1),
    "zeroth-order": ({"sigma": 0.1}, {}, True, 1),
    "rlr": ({"h": 2, "sigma": 0.1, "zo": True, "spans": 1}, {"baseline": "none"}, True, 1),
}


def _setup():
    from chaintune.rewards import FunctionReward
    from chaintune.testing import tiny_unet_model

    model = tiny_unet_model(seed=0)
    _freeze_key_biases(model.denoiser)
    g = torch.Generator().manual_seed(1)
    shape = (N, *model.latent_shape)
    pool = (torch.randn(shape, generator=g), [torch.randn(shape, generator=g) for _ in range(STEPS)])
    target = torch.linspace(0, 1, model.latent_shape[-1] ** 2).reshape(1, 1, *model.latent_shape[1:])
    reward = FunctionReward(lambda images: -((images - target) ** 2).flatten(1).mean(1), differentiable=True,
                            name="target")
    return model, pool, reward


def _freeze_key_biases(module: torch.nn.Module) -> None:
    """Attention key biases shift every score of a query equally, which softmax ignores: their gradient is zero
    analytically, so the computed one is rounding noise, which AdamW's first step turns into +-lr. Not trained."""
    for k, p in module.named_parameters():
        p.requires_grad_(not k.endswith("to_k.bias"))


@contextlib.contextmanager
def _pool_noise(pool, offset: list[int]):
    """Estimators draw noise from ``pool[offset[0]:]`` instead of their generator (restored on exit)."""
    import chaintune.estimators.base as base
    import chaintune.estimators.full as full
    import chaintune.estimators.reinforce as reinforce
    import chaintune.estimators.rlr as rlr

    def draw(ctx, n):
        s = slice(offset[0], offset[0] + n)
        assert s.stop <= N
        return pool[0][s].clone(), [z[s].clone() for z in pool[1]]

    with noise_from(draw, (base, full, reinforce, rlr)):
        yield


def _step(name: str, rank: int, world: int, acc, mesh=None, gen_seed: int = 7, round_trip: bool = False) -> dict:
    """One estimate by ``name`` on this rank's share of the pool (sharded on ``mesh`` if given), reduced,
    then one AdamW step. Returns full (gathered) gradients and parameters by name."""
    from chaintune.estimators import EstimationContext, get_estimator
    from chaintune.run.trainer import reduce_gradients

    est_kw, ctx_kw, mirrored, micro = CASES[name]
    model, pool, reward = _setup()
    if mesh is not None:
        from chaintune.distributed import shard_model

        shard_model(model.denoiser, mesh, min_params=MIN_PARAMS)
    est = get_estimator(name, **est_kw)
    n_rank = N // world
    n = n_rank // micro if world > 1 else N  # the union runs in one micro-batch
    n_micro = micro if world > 1 else 1
    draws = n // 2 if mirrored else n
    offset = [0]
    with _pool_noise(pool, offset):
        for m in range(n_micro):
            offset[0] = rank * (draws * n_micro) + m * draws
            ctx = EstimationContext(model=model, reward=reward, n=n, steps=STEPS, eta=1.0, scheduler=model.scheduler,
                                    conditions=model.default_conditions(n),
                                    generator=torch.Generator().manual_seed(gen_seed), **ctx_kw)
            for _ in est.updates(ctx):
                pass
    named = [(k, p) for k, p in model.denoiser.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    reduce_gradients(params, acc, n_micro)
    full = (lambda t: t.full_tensor()) if mesh is not None else (lambda t: t)
    grads = {k: full(p.grad).detach().clone() for k, p in named}
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.0)
    opt.step()
    out = {"grads": grads, "params": {k: full(p).detach().clone() for k, p in named}}
    if mesh is not None:
        out["sharded"] = sum(p.to_local().numel() < p.numel() for p in params)
    if mesh is not None:
        from chaintune.distributed import grads_finite

        out["finite"] = grads_finite(params)
        with torch.no_grad():
            params[0].grad.to_local().fill_(float("nan") if rank == 1 else 0.0)  # one process's shard only
        out["finite_after_nan_on_rank_1"] = grads_finite(params)
    if round_trip:
        out.update(_checkpoint_round_trip(model, opt, mesh, rank))
    return out


def _checkpoint_round_trip(model, opt, mesh, rank: int) -> dict:
    """Gather the full state dicts on rank 0, then load them into a fresh, differently initialised sharded
    model and optimizer (rank 0 holds the state, the others pass ``{}``) and gather again."""
    from chaintune import distributed as dist_
    from chaintune.testing import tiny_unet_model

    sd = dist_.full_state_dict(model.denoiser)
    osd = dist_.full_optimizer_state_dict(model.denoiser, opt)
    fresh = tiny_unet_model(seed=3).denoiser
    _freeze_key_biases(fresh)
    dist_.shard_model(fresh, mesh, min_params=MIN_PARAMS)
    fresh_opt = torch.optim.AdamW([p for p in fresh.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    dist_.load_full_state_dict(fresh, sd if rank == 0 else {})
    dist_.load_full_optimizer_state_dict(fresh, fresh_opt, osd if rank == 0 else {})
    return {"state_dict": sd, "reloaded": dist_.full_state_dict(fresh), "optim": osd,
            "optim_reloaded": dist_.full_optimizer_state_dict(fresh, fresh_opt)}


def _worker(rank: int, world: int, port: int, out: str) -> None:
    from accelerate import Accelerator
    from torch.distributed.device_mesh import init_device_mesh

    from chaintune.errors import ChaintuneError

    join_ranks(rank, world, port)
    acc = Accelerator(cpu=True)
    assert acc.num_processes == world
    mesh = init_device_mesh("cpu", (world,))
    results = {name: _step(name, rank, world, acc, mesh, round_trip=name == "rlr") for name in CASES}
    # per-process generators (as the trainer's): the perturbation seed and RLR's span (drawn j = 3 on rank 0, 2 on
    # rank 1) are taken from rank 0 ...
    results["zeroth-order/own-generators"] = _step("zeroth-order", rank, world, acc, mesh, gen_seed=7 + 2 * rank)
    results["rlr/own-generators"] = _step("rlr", rank, world, acc, mesh, gen_seed=7 + 2 * rank)
    import chaintune.estimators.rlr as rlr

    shared, rlr.shared_plan = rlr.shared_plan, lambda values, params: list(values)
    try:  # ... and without that, processes perturbing different steps are refused, not averaged wrongly
        _step("rlr", rank, world, acc, mesh, gen_seed=7 + 2 * rank)
        results["rlr/unshared-span"] = "no error"
    except ChaintuneError as e:
        results["rlr/unshared-span"] = str(e)
    finally:
        rlr.shared_plan = shared
    if rank == 0:
        torch.save(results, out)
    acc.wait_for_everyone()
    torch.distributed.destroy_process_group()


def _run(out, world: int = 2) -> dict:
    import torch.multiprocessing as mp

    import chaintune.distributed  # noqa: F401
    import chaintune.estimators  # noqa: F401  (imported before forking, so children start warm)
    import chaintune.run.trainer  # noqa: F401
    import chaintune.testing  # noqa: F401

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_worker, args=(world, port, str(out)), nprocs=world, join=True, start_method="fork")
    return torch.load(str(out), weights_only=False)


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict:
    sharded = _run(tmp_path_factory.mktemp("fsdp") / "rank0.pt")
    ref = {name: _step(name, 0, 1, SimpleNamespace(num_processes=1)) for name in CASES}
    return {"sharded": sharded, "ref": ref}


@pytest.mark.parametrize("name", list(CASES))
def test_sharded_two_processes_equal_one_unsharded_process_on_the_union(results, name):
    got, ref = results["sharded"][name], results["ref"][name]
    assert got["sharded"] > 0.9 * len(got["grads"])  # (nearly) every parameter really is split across ranks
    assert got["grads"].keys() == ref["grads"].keys()
    scale = max(float(g.abs().max()) for g in ref["grads"].values())
    assert scale > 0
    for k, g in ref["grads"].items():  # atol: float32 rounding of the largest gradient entries
        torch.testing.assert_close(got["grads"][k], g, rtol=1e-5, atol=1e-6 * scale, msg=f"{name} grad {k}")
    # the sharded AdamW step is the unsharded step on the same gradients (compared to the reference's own step,
    # entries whose gradient is float32 cancellation noise, |g| ~ 1e-8 of the largest, would differ by up to lr:
    # AdamW's first step is lr * g / (|g| + eps))
    model, _, _ = _setup()
    named = [(k, p) for k, p in model.denoiser.named_parameters() if p.requires_grad]
    for k, p in named:
        p.grad = got["grads"][k].clone()
    torch.optim.AdamW([p for _, p in named], lr=1e-2, weight_decay=0.0).step()
    for k, p in named:
        torch.testing.assert_close(got["params"][k], p.detach(), rtol=1e-6, atol=1e-8, msg=f"{name} param {k}")
    moved = sum(int(((got["params"][k] - ref["params"][k]).abs() > 1e-7 + 1e-5 * ref["params"][k].abs()).sum())
                for k in ref["params"])
    assert moved <= 1e-3 * sum(p.numel() for p in ref["params"].values())  # and the reference's, but for those


def test_halves_differ_so_the_union_check_has_teeth(results):
    """Rank 0's half alone gives a different gradient: the equality above needs both processes' terms."""
    half = _step("full-backprop", 0, 2, SimpleNamespace(num_processes=1))
    ref = results["ref"]["full-backprop"]["grads"]
    assert any(not torch.allclose(half["grads"][k], g, rtol=1e-3) for k, g in ref.items())


def test_full_state_dict_gathers_and_loads_the_sharded_model(results):
    got = results["sharded"]["rlr"]
    sd, ref = got["state_dict"], got["params"]  # (the latter checked against the unsharded run above)
    assert set(ref) < set(sd)  # all parameters (frozen too) and buffers
    for k, v in sd.items():
        assert type(v) is torch.Tensor and v.device.type == "cpu", k
    for k, p in ref.items():
        torch.testing.assert_close(sd[k], p, rtol=0, atol=0)
    assert sd.keys() == got["reloaded"].keys()
    for k, v in sd.items():
        torch.testing.assert_close(got["reloaded"][k], v, rtol=0, atol=0)  # scattered, then gathered: bit-exact
    opt, opt2 = got["optim"], got["optim_reloaded"]
    assert opt["state"].keys() == opt2["state"].keys() == set(ref)
    for k, st in opt["state"].items():
        for field in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(opt2["state"][k][field], st[field], rtol=0, atol=0)
    assert opt["param_groups"][0]["lr"] == opt2["param_groups"][0]["lr"]


@pytest.mark.parametrize("name", ["zeroth-order", "rlr"])
def test_random_plan_is_shared_across_processes(results, name):
    """With a generator per process (the trainer seeds one per rank) every shard is still perturbed along
    rank 0's direction, at rank 0's steps (RLR's span: rank 0's), so the sharded estimate equals the one where
    every process drew rank 0's plan, itself equal to the unsharded one (checked above)."""
    got, same = results["sharded"][f"{name}/own-generators"], results["sharded"][name]
    for k, g in same["grads"].items():
        torch.testing.assert_close(got["grads"][k], g, rtol=0, atol=0, msg=k)


def test_processes_perturbing_different_steps_are_refused(results):
    """The safety net behind the shared plan: if processes did perturb different steps, the estimate refuses."""
    assert "processes perturbed different chain steps" in results["sharded"]["rlr/unshared-span"]


def test_non_finite_gradient_on_one_shard_is_seen_by_every_process(results):
    got = results["sharded"]["full-backprop"]  # rank 0's view; rank 1 held the NaN
    assert got["finite"] is True and got["finite_after_nan_on_rank_1"] is False
