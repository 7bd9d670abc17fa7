"""Turn a reward spec (a string, a callable or a :class:`Reward`) into a :class:`Reward`.

String syntax, shared by the Python API, config files and the CLI::

    digit:3                                   a built-in (name or name:ARG)
    0.7*digit:3+0.3*jpeg-compressibility      a weighted sum (weights default to 1; '+-0.1*x' subtracts)
    mypkg.rewards:score                       a user's function (module:function); cwd is importable
    aesthetic:clip=DIR,head=FILE              an at-scale adapter with its weight paths

A ``+`` only starts a new term when a reward name, a weight or ``module:function`` follows it, so
file names such as ``sac+logos+ava1-l14-linearMSE.pth`` survive inside adapter paths.

A family may also declare how its runs are evaluated (:mod:`chaintune.rewards.evaluation`): ``heldout``
names its held-out twin (a judge training never sees, e.g. ``digit:3`` -> ``digit-heldout:3``) and
``metrics`` computes its own diagnostics on evaluation samples (e.g. ``class_share``, ``nn_distance``).
Trainers then evaluate any spec the same way instead of special-casing reward names.
"""

from __future__ import annotations

import importlib
import os
import re
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from chaintune.errors import ChaintuneError, unknown_name, user_code_error
from chaintune.rewards.base import FunctionReward, Reward, WeightedSum

if TYPE_CHECKING:
    import torch

# arg -> the spec of the family's held-out twin for that arg (None: no twin for it)
HeldoutFn = Callable[[str | None], str | None]
# (arg, images, prompts, labels) -> {metric name without the 'eval/' prefix: value}
MetricsFn = Callable[[str | None, "torch.Tensor", "list[str] | None", "torch.Tensor | None"], dict[str, float]]


@dataclass(frozen=True)
class RewardEntry:
    """A registered reward: ``factory(arg)`` builds it; ``arg`` is the text after ``name:`` or None.

    ``heldout(arg)`` and ``metrics(arg, images, prompts, labels)`` declare the family's evaluation
    (see :mod:`chaintune.rewards.evaluation`); None: no held-out twin / no metrics of its own.
    """

    factory: Callable[[str | None], Reward]
    pattern: str
    description: str
    differentiable: bool
    heldout: HeldoutFn | None = None
    metrics: MetricsFn | None = None


_REGISTRY: dict[str, RewardEntry] = {}


def register_reward(name: str, factory: Callable[[str | None], Reward], pattern: str | None = None,
                    description: str = "", differentiable: bool = False, *, heldout: HeldoutFn | None = None,
                    metrics: MetricsFn | None = None) -> None:
    """Make ``name`` (and ``name:ARG``) usable in reward specs, e.g. by a plugin package.

    ``heldout`` and ``metrics`` declare how runs with this reward are evaluated (module docstring).
    """
    if not re.fullmatch(r"[a-z][a-z0-9_-]*", name):
        raise ChaintuneError(f"reward names are lower-case words with - or _, got {name!r}")
    _REGISTRY[name] = RewardEntry(factory, pattern or name, description, differentiable, heldout, metrics)


def available_rewards() -> dict[str, RewardEntry]:
    """Registered rewards by name (for help texts and docs)."""
    return dict(_REGISTRY)


def int_arg(name: str, arg: str | None, required: bool = True) -> int | None:
    if arg is None or arg == "":
        if required:
            raise ChaintuneError(f"reward {name!r} needs an argument: {name}:K")
        return None
    try:
        return int(arg)
    except ValueError:
        raise ChaintuneError(f"reward {name}:K needs an integer K, got {arg!r}") from None


def no_arg(name: str, factory: Callable[[], Reward]) -> Callable[[str | None], Reward]:
    def build(arg: str | None) -> Reward:
        if arg:
            raise ChaintuneError(f"reward {name!r} takes no argument, got {name}:{arg}")
        return factory()
    return build


def needs_arg(name: str, usage: str, factory: Callable[[str], Reward]) -> Callable[[str | None], Reward]:
    def build(arg: str | None) -> Reward:
        if not arg:
            raise ChaintuneError(f"reward {name!r} needs an argument: {usage}")
        return factory(arg)
    return build


_WEIGHT = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"
_TERM = re.compile(rf"^\s*(?:(?P<w>{_WEIGHT})\s*\*\s*)?(?P<body>.*?)\s*$", re.S)
_MODULE_FN = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_][\w.]*")


def _starts_term(piece: str) -> bool:
    """Whether the text after a '+' begins a new reward term (not a '+' inside a file name)."""
    m = _TERM.match(piece)
    if m is None:
        return False
    if m.group("w") is not None:
        return True
    body = m.group("body")
    head = body.split(":", 1)[0]
    return head in _REGISTRY or bool(_MODULE_FN.fullmatch(body))


def split_terms(spec: str) -> list[tuple[float, str]]:
    """``'0.7*digit:3+0.3*jpeg-compressibility'`` -> ``[(0.7, 'digit:3'), (0.3, 'jpeg-compressibility')]``."""
    pieces = spec.split("+")
    terms = [pieces[0]]
    for piece in pieces[1:]:
        if _starts_term(piece) and not re.search(r"\d[eE]\s*$", terms[-1]):  # not the '+' of '1e+3'
            terms.append(piece)
        else:
            terms[-1] += "+" + piece
    out = []
    for t in terms:
        m = _TERM.match(t)
        body = m.group("body") if m else ""
        if not body:
            raise ChaintuneError(f"reward spec {spec!r} has an empty term; "
                                 f"write e.g. 0.7*digit:3+0.3*jpeg-compressibility")
        out.append((float(m.group("w")) if m.group("w") is not None else 1.0, body))
    return out


def _load_callable(spec: str) -> Reward:
    module_name, _, attr = spec.partition(":")
    try:
        module = _import(module_name)
    except ModuleNotFoundError as e:
        if e.name and module_name.split(".")[0] == e.name.split(".")[0] and "." not in module_name:
            err = unknown_name("reward", module_name, _REGISTRY)
            raise ChaintuneError(f"{err} (or module:function for your own reward)") from None
        raise ChaintuneError(f"reward {spec!r}: cannot import module {module_name!r} ({e})") from e
    except Exception as e:  # the user's module itself failed; CHAINTUNE_DEBUG=1 shows the traceback
        raise ChaintuneError(f"reward {spec!r}: importing {module_name!r} failed: {type(e).__name__}: {e}") from e
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ChaintuneError(f"reward {spec!r}: module {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if isinstance(obj, type) and issubclass(obj, Reward):
        try:
            obj = obj()
        except Exception as e:
            raise user_code_error(f"your reward {spec!r} (creating it)", e) from e
    if isinstance(obj, Reward):
        return obj
    if not callable(obj):
        raise ChaintuneError(f"reward {spec!r} is a {type(obj).__name__}, not a callable")
    return FunctionReward(obj, name=spec)


def _import(module_name: str):
    """Import a user's module; the current directory counts, as users expect from the CLI."""
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        cwd = os.getcwd()
        if e.name != module_name.split(".")[0] or cwd in sys.path or "" in sys.path:
            raise
        sys.path.append(cwd)
        return importlib.import_module(module_name)


def code_terms(spec: str) -> list[str]:
    """The ``module:function`` terms of a spec: rewards that import and run Python code from files."""
    try:
        terms = split_terms(spec.strip())
    except ChaintuneError:
        return []
    return [body for _, body in terms if family_of(body) is None and _MODULE_FN.fullmatch(body.strip())]


def family_of(term: str) -> tuple[str, RewardEntry, str | None] | None:
    """``'digit:3'`` -> ``('digit', entry, '3')`` for one term of a spec; None for ``module:function`` or unknown."""
    name, sep, arg = term.partition(":")
    name = name.strip()
    if name not in _REGISTRY:
        return None
    return name, _REGISTRY[name], arg.strip() if sep else None


def _resolve_one(spec: str) -> Reward:
    name, sep, arg = spec.partition(":")
    name = name.strip()
    if name in _REGISTRY:
        return _REGISTRY[name].factory(arg.strip() if sep else None)
    if sep and _MODULE_FN.fullmatch(spec):
        return _load_callable(spec)
    err = unknown_name("reward", name, _REGISTRY)
    raise ChaintuneError(f"{err} (or module:function for your own reward)")


def get_reward(spec: str | Callable | Reward | Mapping[str, float]) -> Reward:
    """A :class:`Reward` from a spec string, a user callable, a ``{spec: weight}`` mapping or a Reward.

    A plain callable becomes a black-box :class:`FunctionReward` unless it carries
    ``differentiable = True``; wrap it in ``FunctionReward(fn, differentiable=True)`` to say so.
    """
    if isinstance(spec, Reward):
        return spec
    if isinstance(spec, Mapping):
        return WeightedSum([(float(w), get_reward(s)) for s, w in spec.items()])
    if callable(spec):
        return FunctionReward(spec)
    if not isinstance(spec, str) or not spec.strip():
        raise ChaintuneError(f"a reward spec must be a non-empty string, a callable or a Reward, got {spec!r}")
    terms = split_terms(spec.strip())
    if len(terms) == 1 and terms[0][0] == 1.0:
        return _resolve_one(terms[0][1])
    return WeightedSum([(w, _resolve_one(body)) for w, body in terms])


