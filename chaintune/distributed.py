"""Sharded data parallelism (FSDP2) for full fine-tuning of models that do not fit one device.

Why this is not plain FSDP usage: chaintune's estimators build ``-grad J`` in ``.grad`` in two ways,
by backward (pathwise and likelihood-ratio terms) and by direct writes (zeroth-order terms), and the
model is never wrapped in DDP. Under FSDP2 parameters and gradients are DTensors holding one shard per
process, and the final gradient must still be the mean over processes of each process's estimate:

* backpropagated terms: FSDP reduce-scatters (averages over the mesh) after every backward and adds the
  result to the sharded ``.grad``, so they arrive averaged;
* zeroth-order terms: :class:`chaintune.estimators.base.Perturbation` shares one seed across processes (a
  forward all-gathers every shard, so all must perturb alike), perturbs each shard with the slice of the
  full-shape direction, and writes the process mean of its scale, so they arrive averaged too;
* :func:`chaintune.run.trainer.reduce_gradients` then only divides sharded gradients by the number
  of micro-batches (no second all-reduce).

Every process must run the same sequence of forwards and backwards through the sharded modules (FSDP's
collectives pair up across processes) and, for zeroth-order terms, perturb the same chain steps; the
estimators' random plans (RLR's span, the perturbation seed, truncated backprop's stop, DDPO's subset of
positions) must therefore agree across processes. Each process draws its plan from its own generator (the
one its samples come from) and :func:`shared_plan` replaces it by the first process's, so the samples
still differ per process while the plan is one.

:class:`chaintune.run.trainer.Trainer` does all of this under ``--fsdp`` (``RunConfig.fsdp``):
shards ``model.denoiser`` after the objective's ``prepare``, builds AdamW over the shards, checkpoints
full (gathered) tensors in the unsharded format, and exports a plain diffusers model through an
unsharded twin (:func:`meta_copy`, :func:`unsharded_copy`).
"""

from __future__ import annotations

import copy
import sys
from typing import Any

import torch
from torch import nn

from chaintune.errors import ChaintuneError

DEFAULT_MIN_PARAMS = 50_000_000  # ~200 MB in fp32: one all-gather unit (transformer block, UNet down block)


def is_sharded(t: torch.Tensor) -> bool:
    """Whether ``t`` is a DTensor (an FSDP2 parameter or gradient shard).

    Without importing ``torch.distributed.tensor`` (~1 s): if nothing imported it, no tensor can be a DTensor.
    """
    mod = sys.modules.get("torch.distributed.tensor")
    return mod is not None and isinstance(t, mod.DTensor)


def local_shard(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``full`` (the full, unsharded shape) on ``like``'s device and dtype, sharded as ``like`` if it is a DTensor.

    Every process slices its own copy (``src_data_rank=None``: no communication), so the shards are the
    numbers the unsharded tensor would have.
    """
    full = full.to(like.device, like.dtype)
    if not is_sharded(like):
        return full
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(full, like.device_mesh, like.placements, src_data_rank=None)


def shard_group(params: list[torch.Tensor]) -> Any:
    """The process group that sharded ``params`` are averaged over (all ranks of their mesh); None if unsharded."""
    mesh = next((p.device_mesh for p in params if is_sharded(p)), None)
    if mesh is None or mesh.size() == 1:
        return None
    if mesh.ndim == 1:
        return mesh.get_group()
    if mesh.size() != torch.distributed.get_world_size():
        raise ChaintuneError(f"a {mesh.ndim}-d device mesh must span all processes (FSDP/HSDP data parallel only)")
    return torch.distributed.group.WORLD


def comm_device(group: Any) -> torch.device:
    """Where a small tensor for a collective on ``group`` must live (NCCL: the current GPU)."""
    if "nccl" in str(torch.distributed.get_backend(group)):
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def default_mesh(device: torch.device | str | None = None) -> Any:
    """A 1-d mesh over all processes (the process group must exist: ``accelerate`` or ``init_process_group``)."""
    from torch.distributed.device_mesh import init_device_mesh

    dev = torch.device(device) if device is not None else (
        torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))
    return init_device_mesh(dev.type, (torch.distributed.get_world_size(),))


def _callable(module: nn.Module) -> bool:
    """Containers without a forward (ModuleList/ModuleDict) never fire FSDP's hooks: shard their items instead."""
    return not isinstance(module, (nn.ModuleList, nn.ModuleDict))


def shard_model(module: nn.Module, mesh: Any = None, *, min_params: int = DEFAULT_MIN_PARAMS) -> nn.Module:
    """Shard ``module`` in place with FSDP2 (``fully_shard``): every submodule holding at least ``min_params``
    parameters not already in a sharded descendant becomes one all-gather unit (post-order, as a size-based
    auto-wrap policy: for diffusers that is each large transformer/down/up block), then the root takes the rest.

    Call it after adapters (PEFT) are applied and before the optimizer is built (parameters become DTensors).
    ``reshard_after_forward=True`` everywhere, the root included (FSDP's default keeps the root unsharded
    after forward): zeroth-order estimates change the sharded parameters between forwards, and an unsharded
    root would keep running its stale all-gathered copy. A unit's parameters are only gathered when the unit itself
    is called: a module whose parent reads its weights directly (rare in diffusers) must stay below ``min_params``.
    """
    from torch.distributed.fsdp import fully_shard

    if mesh is None:
        mesh = default_mesh(next(module.parameters()).device)

    def visit(m: nn.Module) -> int:
        """Shard large descendants of ``m``; return the parameter count ``m`` still holds itself."""
        own = sum(p.numel() for p in m.parameters(recurse=False))
        rest = own + sum(visit(c) for c in m.children())
        if m is not module and rest >= min_params and _callable(m) and rest > 0:
            fully_shard(m, mesh=mesh, reshard_after_forward=True)
            return 0
        return rest

    visit(module)
    fully_shard(module, mesh=mesh, reshard_after_forward=True)
    return module


def grads_finite(params: list[torch.Tensor]) -> bool:
    """Whether every gradient is finite on every process; a collective when ``params`` are sharded.

    ``torch.isfinite(p.grad).all()`` on a DTensor checks only this process's shard: processes would disagree
    on skipping a step, and their collectives would no longer pair up.
    """
    ok = all(bool(torch.isfinite(p.grad.to_local() if is_sharded(p.grad) else p.grad).all())
             for p in params if p.grad is not None)
    group = shard_group(params)
    if group is None:
        return ok
    flag = torch.tensor([1 if ok else 0], dtype=torch.int32, device=comm_device(group))
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN, group=group)
    return bool(flag.item())


def full_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """The full (unsharded) state dict on CPU on rank 0, ``{}`` on other ranks; a collective: call it on every rank.

    For checkpoints of a sharded model: rank 0 writes what an unsharded run would write.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_state_dict(module: nn.Module, state: dict[str, torch.Tensor], *, strict: bool = True) -> None:
    """Load a full state dict held by rank 0 (other ranks may pass ``{}``) into a sharded ``module``; a collective.

    Rank 0's tensors are broadcast and each rank keeps its shard, so only rank 0 reads the checkpoint.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    opts = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=strict)
    set_model_state_dict(module, _containers_copied(state), options=opts)


def full_optimizer_state_dict(module: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer's full state dict (keyed by parameter names) on CPU on rank 0, ``{}`` elsewhere; a collective."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(module, optimizer,
                                    options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_optimizer_state_dict(module: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load :func:`full_optimizer_state_dict`'s output (rank 0; others pass ``{}``) into a sharded run; a collective."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(module, optimizer, _containers_copied(state),
                             options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))


def _containers_copied(obj: Any) -> Any:
    """``obj`` with its dicts and lists copied (tensors shared): loading replaces the values of the dict it is
    given with DTensors, which must not leak into the caller's (rank 0's) state."""
    if isinstance(obj, dict):
        return {k: _containers_copied(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_containers_copied(v) for v in obj)
    return obj


def rank_world() -> tuple[int, int]:
    """(this process's rank, number of processes); (0, 1) without a process group."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def shared_plan(values: list[int], params: list[torch.Tensor]) -> list[int]:
    """The first process's ``values`` on every process when ``params`` are sharded (a broadcast), else ``values``.

    For an estimator's random plan (RLR's span, the chain positions a step trains): each process draws it from
    its own generator, and under FSDP all must run the same one. Every process must call this with as many
    values (the same plan shape) at the same point.
    """
    values = [int(v) for v in values]
    group = shard_group(params)
    if group is None or not values:
        return values
    t = torch.tensor(values, dtype=torch.long, device=comm_device(group))
    torch.distributed.broadcast(t, group=group, group_src=0)
    return [int(v) for v in t.tolist()]


def gather_full(t: torch.Tensor) -> torch.Tensor:
    """The full tensor of a shard (an all-gather: call it on every process, in the same order); ``t`` itself if
    it is not sharded."""
    return t.full_tensor() if is_sharded(t) else t


def meta_copy(module: nn.Module) -> nn.Module:
    """A copy of ``module`` whose parameters live on the meta device (no memory; buffers are copied).

    Taken before :func:`shard_model`, it keeps the unsharded class and structure, so that
    :func:`unsharded_copy` can later build the plain module a checkpoint or ``save_pretrained`` needs.
    """
    memo = {id(p): nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
            for p in module.parameters()}
    return copy.deepcopy(module, memo)


def unsharded_copy(skeleton: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    """A plain (unsharded) module: a copy of :func:`meta_copy`'s ``skeleton`` holding ``state``
    (:func:`full_state_dict`'s output on rank 0) without copying its tensors."""
    twin = copy.deepcopy(skeleton)
    twin.load_state_dict(state, strict=True, assign=True)
    return twin
