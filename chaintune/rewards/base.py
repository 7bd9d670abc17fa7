"""The reward interface: a callable on images in [0, 1] that returns one float per image.

Rewards are plain callables (as in TRL) so that a user's function, a shipped classifier and a
black-box scorer all plug into the same trainer. ``differentiable`` tells the estimators whether
the pathwise (first-order) term may backpropagate through the reward; black-box rewards only feed
the likelihood-ratio (half/zeroth-order) terms.

Reward networks are frozen (``requires_grad`` False) and are *not* ``nn.Module`` attributes of
anything the trainer optimises, so their parameters can never reach an optimizer, while gradients
still flow to the input images of differentiable rewards.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from chaintune.errors import ChaintuneError, user_code_error


class Reward:
    """Base class: override :meth:`forward`; call the instance.

    ``__call__(images, prompts=None, labels=None, metadata=None) -> Tensor[n]``. Non-differentiable
    rewards run under ``torch.no_grad`` and return detached values.
    """

    name: str = "reward"
    differentiable: bool = False
    needs_prompts: bool = False
    needs_labels: bool = False

    def forward(self, images: torch.Tensor, prompts: list[str] | None, labels: torch.Tensor | None,
                metadata: Any) -> torch.Tensor:
        raise NotImplementedError

    def __call__(self, images: torch.Tensor, prompts: Sequence[str] | str | None = None,
                 labels: torch.Tensor | Sequence[int] | int | None = None, metadata: Any = None) -> torch.Tensor:
        if not isinstance(images, torch.Tensor) or images.dim() != 4:
            shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise ChaintuneError(f"reward {self.name!r} expects images as a tensor [n, C, H, W] in [0, 1], got {shape}")
        n = images.shape[0]
        prompts = _as_prompts(prompts, n)
        labels = _as_labels(labels, n, images.device)
        if self.needs_prompts and prompts is None:
            raise ChaintuneError(f"reward {self.name!r} scores images against prompts; the model gave none")
        if self.needs_labels and labels is None:
            raise ChaintuneError(f"reward {self.name!r} needs class labels (a class-conditional model) or a "
                                 f"fixed class in the spec")
        try:
            if self.differentiable:
                return self.forward(images, prompts, labels, metadata)
            with torch.no_grad():
                return self.forward(images.detach(), prompts, labels, metadata).detach()
        except ChaintuneError:
            raise
        except Exception as e:
            if _is_users(self):  # a user's Reward subclass failed: their code, not a chaintune bug
                raise user_code_error(f"your reward {self.name!r}", e) from e
            raise

    def __repr__(self) -> str:
        kind = "differentiable" if self.differentiable else "black-box"
        return f"{type(self).__name__}({self.name!r}, {kind})"

    def __add__(self, other: Reward) -> WeightedSum:
        return WeightedSum([(1.0, self), (1.0, other)])

    def __mul__(self, weight: float) -> WeightedSum:
        return WeightedSum([(float(weight), self)])

    __rmul__ = __mul__


def _is_users(reward: Reward) -> bool:
    """Whether ``reward`` is an instance of a class defined outside chaintune (a user's subclass)."""
    return not type(reward).__module__.startswith("chaintune.")


def _as_prompts(prompts, n: int) -> list[str] | None:
    if prompts is None:
        return None
    p = [prompts] if isinstance(prompts, str) else list(prompts)
    if len(p) == 1 and n != 1:
        p = p * n
    if len(p) != n:
        raise ChaintuneError(f"got {len(p)} prompts for {n} images")
    return p


def _as_labels(labels, n: int, device: torch.device) -> torch.Tensor | None:
    if labels is None:
        return None
    t = torch.as_tensor(labels, dtype=torch.long).flatten()
    if t.numel() == 1 and n != 1:
        t = t.repeat(n)
    if t.numel() != n:
        raise ChaintuneError(f"got {t.numel()} labels for {n} images")
    return t.to(device)


def frozen(net: nn.Module) -> nn.Module:
    """Eval mode and no parameter gradients: the reward judges, it is never trained."""
    return net.eval().requires_grad_(False)


class NetworkReward(Reward):
    """A reward computed by a frozen network that follows the images to their device.

    The network is created lazily by ``load()`` (so building a reward spec is cheap and errors about
    missing weights come when the reward is first used or :meth:`check` is called).
    """

    def __init__(self) -> None:
        self._net: nn.Module | None = None
        self._device: torch.device | None = None

    def load(self) -> nn.Module:
        raise NotImplementedError

    def network(self, device: torch.device) -> nn.Module:
        if self._net is None:
            self._net = frozen(self.load())
        if self._device != device:
            self._net = self._net.to(device)
            self._device = device
        self._net.eval()  # a caller's .train() on a parent module must not switch dropout/batch-norm on
        return self._net

    def net_dtype(self) -> torch.dtype:
        p = next(self._net.parameters(), None) if self._net is not None else None
        return p.dtype if p is not None else torch.float32

    def to(self, device: str | torch.device) -> NetworkReward:
        self.network(torch.device(device))
        return self


class FunctionReward(Reward):
    """Wrap a user's callable ``fn(images, [prompts], [labels], [metadata]) -> [n]``.

    Only the keyword arguments ``fn`` declares are passed, so ``lambda images: ...`` works. The
    result may be a tensor, an array or a list; it is returned as float32 on the images' device.
    ``differentiable`` defaults to False (the safe choice: the trainer then never backpropagates
    through it); it is read from ``fn.differentiable`` when the function carries that attribute.
    """

    def __init__(self, fn: Callable, differentiable: bool | None = None, name: str | None = None) -> None:
        if not callable(fn):
            raise ChaintuneError(f"a reward must be callable, got {type(fn).__name__}")
        self.fn = fn
        self.differentiable = bool(getattr(fn, "differentiable", False) if differentiable is None else differentiable)
        self.name = name or getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or repr(fn)
        self._accepts = _accepted_kwargs(fn)

    def forward(self, images, prompts, labels, metadata):
        extra = {"prompts": prompts, "labels": labels, "metadata": metadata}
        kwargs = {k: v for k, v in extra.items() if self._accepts is None or k in self._accepts}
        try:
            out = self.fn(images, **kwargs)
        except ChaintuneError:
            raise
        except Exception as e:  # the user's function failed: say so, with the exception's type
            raise user_code_error(f"your reward {self.name!r}", e) from e
        if isinstance(out, tuple) and len(out) == 2 and isinstance(out[1], dict):
            out = out[0]  # DDPO-style (values, info) return
        if isinstance(out, torch.Tensor):
            _check_real(out, self.name)
            out = out.to(images.device)
            return out if out.is_floating_point() else out.float()
        try:
            values = torch.as_tensor(out)  # its own dtype first: a complex array must not be cast silently
        except (TypeError, ValueError, RuntimeError) as e:
            raise ChaintuneError(f"reward {self.name!r} returned {type(out).__name__}, not numbers: {e}") from e
        _check_real(values, self.name)
        return values.to(device=images.device, dtype=torch.float32)


def _accepted_kwargs(fn: Callable) -> set[str] | None:
    """Names of the optional arguments ``fn`` takes; None when it takes ``**kwargs``."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return None
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    named = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return {p.name for p in params if p.kind in named}


class WeightedSum(Reward):
    """``sum_i w_i * R_i(images)``: differentiable only when every part is."""

    def __init__(self, terms: Sequence[tuple[float, Reward]]) -> None:
        flat: list[tuple[float, Reward]] = []
        for w, r in terms:
            if isinstance(r, WeightedSum):  # (a + b) + c stays one flat sum
                flat.extend((float(w) * w2, r2) for w2, r2 in r.terms)
            else:
                flat.append((float(w), r))
        if not flat:
            raise ChaintuneError("a weighted sum of rewards needs at least one term")
        self.terms = flat
        self.differentiable = all(r.differentiable for _, r in flat)
        self.needs_prompts = any(r.needs_prompts for _, r in flat)
        self.name = "+".join(r.name if w == 1.0 else f"{w:g}*{r.name}" for w, r in flat)

    def parts(self, images, prompts=None, labels=None, metadata=None) -> dict[str, torch.Tensor]:
        """Each term's unweighted values, for logging the components of a combined reward."""
        return {r.name: r(images, prompts, labels, metadata) for _, r in self.terms}

    def __call__(self, images, prompts=None, labels=None, metadata=None) -> torch.Tensor:
        total = None
        for w, r in self.terms:
            v = validate_reward_output(r(images, prompts, labels, metadata), images.shape[0], r.name)
            total = w * v if total is None else total + w * v
        return total if self.differentiable else total.detach()


class BlackBox(Reward):
    """``blackbox:SPEC``: any reward as a black box, scored on what a file on disk holds (8-bit pixels), without
    its gradient. Why: the estimators compared on a black-box reward (a rater behind an API, a non-differentiable
    pipeline) should differ from the differentiable comparison only in what they may use; wrapping the same reward
    keeps its signal and its held-out twin. Works for images and videos alike (the inner reward checks the shape)."""

    differentiable = False

    def __init__(self, inner: Reward, spec: str = "") -> None:
        self.inner = inner
        self.needs_prompts, self.needs_labels = inner.needs_prompts, inner.needs_labels
        self.name = f"blackbox:{spec or inner.name}"

    def __call__(self, images, prompts=None, labels=None, metadata=None) -> torch.Tensor:
        with torch.no_grad():
            saved = (images.detach().float().clamp(0, 1) * 255).round() / 255
            return self.inner(saved.to(images.dtype), prompts, labels, metadata).detach()


def _check_real(values: torch.Tensor, name: str) -> None:
    """Refuse complex values: casting them to float drops the imaginary part without a word."""
    if values.is_complex():
        raise ChaintuneError(f"reward {name!r} returned complex values ({values.dtype}); a reward is one real number "
                             "per image (take .real or .abs() in your function if that is what you mean)")


def validate_reward_output(values: Any, n: int, name: str = "reward") -> torch.Tensor:
    """Check a reward's output is a finite float tensor of shape [n]; return it.

    Raised as one :class:`ChaintuneError` so a buggy user reward fails with a message naming the
    reward instead of a shape error deep inside an estimator (or a silent NaN in the weights).
    """
    if not isinstance(values, torch.Tensor):
        raise ChaintuneError(f"reward {name!r} must return a torch tensor of shape [{n}], got {type(values).__name__}")
    if tuple(values.shape) != (n,):
        raise ChaintuneError(f"reward {name!r} must return shape [{n}] (one value per image), got {list(values.shape)}")
    _check_real(values, name)
    if not values.is_floating_point():
        raise ChaintuneError(f"reward {name!r} must return a float tensor, got {values.dtype}")
    finite = torch.isfinite(values.detach())
    if not bool(finite.all()):
        bad = int((~finite).sum())
        raise ChaintuneError(f"reward {name!r} returned {bad} non-finite value(s) (NaN/inf) out of {n}")
    return values
