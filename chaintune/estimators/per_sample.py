"""Per-sample gradients of the rollout's log-probs, gathered while sampling (DDPO's first epoch without a replay).

DDPO's first PPO epoch is on-policy: the ratio is exactly 1 and its gradient is
``-(1/n) sum_k A_k sum_i grad log p(x_{i+1} | x_i)_k``. The advantages A_k are known only after the
reward, so the usual way recomputes every step's forward pass once they are (or keeps every step's graph
alive until then: memory linear in the steps). Here each step's log-probs are backpropagated at once,
and the gradient *of each sample* G_k = sum_i grad log p_k is kept instead: n copies of the trainable
parameters, which for LoRA are small, and one step's activations. After the reward the estimate is
``-(1/n) sum_k A_k G_k`` — the same gradient without a second forward pass per step.

One batched backward gives every sample's gradient because samples do not interact inside a denoiser:
at a linear layer with input rows x_r and output gradients g_r, row r contributes g_r x_r^T, and the
rows of a sample are summed. Which rows belong to which sample is the one assumption (the batch is the
leading dimension, classifier-free guidance stacks whole copies of it: row r is sample r mod n); it is
checked once per model against autograd on a random combination of the samples, and where it fails —
or where a trainable tensor is not a ``nn.Linear``'s weight or bias (convolutions, norms of a full
fine-tune), FSDP shards — the estimator recomputes as before.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from chaintune.distributed import is_sharded
from chaintune.utils.gradcheck import gradient_mismatch

__all__ = ["PerSampleGradients"]

# the largest per-sample buffer (n x trainable parameters, float32) worth holding instead of a replay
MAX_BYTES = 2 * 1024**3


class PerSampleGradients:
    """Accumulates G_k = sum over calls of grad_theta lp_k for the trainable ``nn.Linear`` tensors of ``module``.

    Use as a context manager around the rollout; :meth:`add` takes each step's per-sample log-probs ``[n]``
    with a graph (and frees it). :meth:`combine` then writes ``sum_k w_k G_k`` into ``.grad``.
    """

    def __init__(self, module: nn.Module, n: int):
        self.n = n
        self.layers: list[nn.Linear] = []
        covered: set[int] = set()
        for m in module.modules():
            if isinstance(m, nn.Linear) and any(p.requires_grad for p in m.parameters(recurse=False)):
                self.layers.append(m)
                covered.update(id(p) for p in m.parameters(recurse=False) if p.requires_grad)
        self.params = [p for p in module.parameters() if p.requires_grad]
        numel = sum(p.numel() for p in self.params)
        # FSDP shards (DTensors) would need their per-sample pieces gathered: those runs recompute
        self.supported = bool(self.params) and all(id(p) in covered for p in self.params) \
            and 4 * n * numel <= MAX_BYTES and not any(is_sharded(p) for p in self.params)
        self.grads: dict[int, torch.Tensor] = {}  # id(param) -> [n, *param.shape]
        self.steps: set[int] = set()  # the chain positions added
        self._calls: list[tuple[nn.Linear, torch.Tensor, torch.Tensor]] = []  # this step's (layer, input, output)
        self._handles: list = []

    def __enter__(self) -> PerSampleGradients:
        for m in self.layers:
            self._handles.append(m.register_forward_hook(self._forward_hook))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._calls.clear()

    def _forward_hook(self, m: nn.Linear, inputs, output) -> None:
        if torch.is_grad_enabled() and output.requires_grad:
            self._calls.append((m, inputs[0].detach(), output))

    def add(self, step_index: int, lp: torch.Tensor, check: bool = False) -> bool:
        """Backpropagate chain position ``step_index``'s log-probs ``[n]`` into the per-sample sums (the graph is
        then freed; :attr:`steps` records the position).

        Autograd goes only as far as the linear layers' outputs (their weight gradients are formed here, per
        sample). ``check``: compare, on this step, a random combination of the per-sample gradients with
        autograd's gradient of the same combination; returns False (and adds nothing) where they differ."""
        calls, self._calls = self._calls, []
        outs = [o for _, _, o in calls]
        gs = torch.autograd.grad(lp.sum(), outs, retain_graph=check, allow_unused=True) if outs else []
        step: dict[int, torch.Tensor] = {}
        low_precision = False  # under autocast autograd's own weight gradients are rounded: compare loosely
        for (m, x, _), g in zip(calls, gs, strict=True):
            if g is None:
                continue
            low_precision |= g.dtype in (torch.bfloat16, torch.float16)
            rows = g.shape[0]
            if rows % self.n or x.shape[0] != rows:
                warnings.warn(f"per-sample gradients: a linear layer saw {rows} rows for {self.n} samples; "
                              "recomputing instead", stacklevel=2)
                return False
            dt = torch.promote_types(g.dtype, torch.float32)
            g3 = g.reshape(rows, -1, g.shape[-1]).to(dt)
            if m.weight.requires_grad:
                x3 = x.reshape(rows, -1, x.shape[-1]).to(dt)
                _add(step, m.weight, torch.einsum("rlo,rli->roi", g3, x3), self.n)
            if m.bias is not None and m.bias.requires_grad:
                _add(step, m.bias, g3.sum(1), self.n)
        if check:
            c = torch.randn(self.n, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
            want = torch.autograd.grad((lp * c.to(lp)).sum(), self.params, allow_unused=True)
            ref, got = {}, {}
            for i, (p, w) in enumerate(zip(self.params, want, strict=True)):
                ref[str(i)] = torch.zeros_like(p) if w is None else w
                g = step.get(id(p))
                got[str(i)] = torch.zeros_like(p) if g is None else torch.einsum("k,k...->...", c.to(g), g)
            if gradient_mismatch(ref, got, rtol=5e-2 if low_precision else 1e-4) is not None:
                warnings.warn("per-sample gradients differ from autograd's on this model (its batch rows are not "
                              "whole copies of the samples); recomputing instead", stacklevel=2)
                return False
        for k, v in step.items():
            self.grads[k] = self.grads[k] + v if k in self.grads else v
        self.steps.add(step_index)
        return True

    def combine(self, weights: torch.Tensor) -> None:
        """``p.grad += sum_k weights_k G_k`` for every trainable tensor (zero where it got no gradient)."""
        w = weights.detach()
        for p in self.params:
            g = self.grads.get(id(p))
            if g is None:
                continue
            upd = torch.einsum("k,k...->...", w.to(g), g).to(p.dtype)
            p.grad = upd if p.grad is None else p.grad + upd


def _add(step: dict[int, torch.Tensor], p: torch.Tensor, per_row: torch.Tensor, n: int) -> None:
    per_sample = per_row.reshape(-1, n, *per_row.shape[1:]).sum(0)  # row r -> sample r mod n
    step[id(p)] = step[id(p)] + per_sample if id(p) in step else per_sample
