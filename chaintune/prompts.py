"""Prompts: files, prompt functions, and per-stage prompts for "diffusive chain of thought".

* :func:`load_prompts` turns a prompt source into a :class:`PromptSource` that draws ``n`` prompts
  with a generator (reproducible, per-process seeds). Sources: a list of strings, a text file (one
  prompt a line; blank lines and ``#`` comments skipped), a JSON file (a list of strings, or of
  objects with a ``"prompt"`` key), a callable ``() -> str | (str, metadata)`` (DDPO's prompt
  functions), or ``builtin:NAME`` (see :data:`BUILTIN_PROMPTS`).
* :class:`StagePrompts` gives the coarse / mid / fine stages of the chain their own prompts (RLR
  paper, DCoT section); :class:`StagedModel` wraps a model so that its denoiser closure switches
  conditioning by chain position, which every estimator and ``chaintune.sample`` then use
  unchanged. Pair it with ``RLR(j=(a, b))`` to repair one stage.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from chaintune.backends.base import Conditions
from chaintune.chain import prepare_scheduler
from chaintune.data.moving import all_prompts
from chaintune.errors import ChaintuneError, shown, user_code_error
from chaintune.sampling import chain_scheduler
from chaintune.utils.io import check_input_file

__all__ = ["BUILTIN_PROMPTS", "PromptSource", "load_prompts", "StagePrompts", "StagedModel", "STAGES"]

_ANIMALS = ["cat", "dog", "horse", "rabbit", "owl", "fox", "bear", "deer", "duck", "frog", "lion", "tiger",
            "elephant", "giraffe", "monkey", "panda", "penguin", "zebra", "koala", "wolf"]
_ACTIVITIES = ["riding a bike", "playing chess", "washing dishes", "reading a book", "playing the piano"]

BUILTIN_PROMPTS: dict[str, list[str]] = {
    "animals": _ANIMALS,  # DDPO's simple_animals
    "animal-activities": [f"a {a} {act}" for a in _ANIMALS[:10] for act in _ACTIVITIES],
    "moving-digits": all_prompts(),  # what builtin:moving-digits was trained on
    "hands": ["a photo of a person waving", "a close-up of two hands holding a cup", "a pianist's hands on the keys",
              "a person giving a thumbs up", "a hand holding a pencil"],
}

STAGES = ("coarse", "mid", "fine")


class PromptSource:
    """Draws prompts: uniformly from a fixed list, or by calling a prompt function."""

    def __init__(self, prompts: Sequence[str] | None = None, fn: Callable | None = None, name: str = "prompts"):
        if (prompts is None) == (fn is None):
            raise ChaintuneError("give either a list of prompts or a prompt function")
        if prompts is not None and not prompts:
            raise ChaintuneError(f"{name}: no prompts")
        self.prompts = None if prompts is None else list(prompts)
        self.fn = fn
        self.name = name

    def __len__(self) -> int:
        return len(self.prompts) if self.prompts is not None else 0

    def sample(self, n: int, generator: torch.Generator | None = None) -> list[str]:
        """``n`` prompts; list sources draw with replacement using ``generator``."""
        if self.prompts is not None:
            idx = torch.randint(0, len(self.prompts), (n,), generator=generator)
            return [self.prompts[int(i)] for i in idx]
        out = []
        for _ in range(n):
            try:
                p = self.fn()
            except Exception as e:
                raise user_code_error(f"your prompt function {self.name!r}", e) from e
            out.append(p[0] if isinstance(p, tuple) else p)  # DDPO prompt functions return (prompt, metadata)
        if not all(isinstance(p, str) for p in out):
            raise ChaintuneError(f"prompt function {self.name} must return str or (str, metadata)")
        return out


def _read_file(path: Path) -> list[str]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ChaintuneError(f"prompt file {path} is not UTF-8 text ({e})") from e
    if path.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ChaintuneError(f"prompt file {path} is not valid JSON: {e}") from e
        except RecursionError:  # json recurses once per nesting level
            raise ChaintuneError(f"prompt file {path} is nested too deeply; it is a list of prompts") from None
        if not isinstance(data, list):
            raise ChaintuneError(f"{path}: expected a JSON list of prompts")
        prompts = [d.get("prompt") if isinstance(d, dict) else d for d in data]
        for i, p in enumerate(prompts):
            if not isinstance(p, str):  # a nested list, a number, an object without a string 'prompt'
                raise ChaintuneError(f"{path}: a prompt file is a list of strings or of objects with a 'prompt' key "
                                     f"(a string), e.g. [\"a cat\", {{\"prompt\": \"a dog\"}}]; item {i} is "
                                     f"{shown(data[i])}")
        return prompts
    lines = [ln.strip() for ln in text.splitlines()]
    return [ln for ln in lines if ln and not ln.startswith("#")]


def load_prompts(source: str | Path | Sequence[str] | Callable | PromptSource) -> PromptSource:
    """A :class:`PromptSource` from a list, a file, a prompt function or ``builtin:NAME``."""
    if isinstance(source, PromptSource):
        return source
    if callable(source):
        return PromptSource(fn=source, name=getattr(source, "__name__", "prompt function"))
    if isinstance(source, str) and source.startswith("builtin:"):
        name = source.split(":", 1)[1]
        if name not in BUILTIN_PROMPTS:
            raise ChaintuneError(f"unknown builtin prompt set {name!r}; available: {sorted(BUILTIN_PROMPTS)}")
        return PromptSource(BUILTIN_PROMPTS[name], name=source)
    if isinstance(source, (str, Path)):
        path = check_input_file(Path(source).expanduser(), "prompt file")  # a pipe would block the read
        prompts = _read_file(path)
        if not prompts:
            raise ChaintuneError(f"prompt file {path} has no prompts")
        return PromptSource(prompts, name=str(path))
    return PromptSource([str(p) for p in source], name="list")


StagePrompt = str | Sequence[str] | Callable[[str], str] | None


@dataclass
class StagePrompts:
    """Prompts for the coarse / mid / fine thirds of the chain (DCoT).

    Each stage is ``None`` (keep the sample's own prompt), one string for every sample, a list with
    one prompt per sample, or a function of the sample's prompt (e.g. ``lambda p: p + ", detailed
    hands"``). ``boundaries = (b1, b2)`` split the chain by *position fraction*: position i of T
    is coarse while i / T < b1, mid while i / T < b2, fine after. Positions come from the chain's
    timesteps when the sampler is known (:class:`StagedModel` ``steps``/``scheduler``), else from
    the noise level: fraction = 1 - t / num_train_timesteps (approximate: within a step of the
    exact split, depending on the timestep spacing).
    """

    coarse: StagePrompt = None
    mid: StagePrompt = None
    fine: StagePrompt = None
    boundaries: tuple[float, float] = (1 / 3, 2 / 3)

    def __post_init__(self):
        b1, b2 = self.boundaries
        if not 0 <= b1 <= b2 <= 1:
            raise ChaintuneError(f"boundaries must satisfy 0 <= b1 <= b2 <= 1, got {self.boundaries}")

    def stage_of_fraction(self, frac: float) -> str:
        b1, b2 = self.boundaries
        return "coarse" if frac < b1 else ("mid" if frac < b2 else "fine")

    def prompts_for(self, stage: str, base: list[str] | None, n: int) -> list[str] | None:
        """The prompts stage ``stage`` conditions on, for ``n`` samples whose own prompts are ``base``."""
        spec = getattr(self, stage)
        if spec is None:
            return base
        if isinstance(spec, str):
            return [spec] * n
        if callable(spec):
            if base is None:
                raise ChaintuneError(f"stage {stage!r} is a function of the prompt, but the samples have no prompts")
            try:
                return [spec(p) for p in base]
            except Exception as e:
                raise user_code_error(f"your {stage} stage prompt function", e) from e
        spec = list(spec)
        if len(spec) == 1:
            return spec * n
        if len(spec) != n:
            raise ChaintuneError(f"stage {stage!r} has {len(spec)} prompts for {n} samples")
        return spec


class StagedModel:
    """A model whose denoiser closure conditions each chain position on its stage's prompts.

    ``denoise_fn(cond)`` builds one closure per stage (prompts encoded once per stage) and picks
    one by the timestep it is called with. Everything else (``denoiser``, ``decode``, ``scheduler``,
    ...) is the wrapped model's, so estimators, trainers and ``chaintune.sample`` use it as is.
    Give ``steps`` (and ``scheduler``, default the model's chain scheduler) to split by exact chain
    position; without them the split uses the noise level t / num_train_timesteps.
    """

    def __init__(self, model, stages: StagePrompts, steps: int | None = None, scheduler=None):
        object.__setattr__(self, "model", model)
        object.__setattr__(self, "stages", stages)
        object.__setattr__(self, "_positions", self._position_map(model, steps, scheduler))

    @staticmethod
    def _position_map(model, steps, scheduler) -> dict[float, float] | None:
        if steps is None:
            return None

        sched = prepare_scheduler(scheduler if scheduler is not None else chain_scheduler(model, "ddim"), steps)
        return {round(float(t), 3): i / steps for i, t in enumerate(sched.timesteps)}

    def __getattr__(self, name):
        if name in ("model", "stages", "_positions") or name.startswith("__"):
            raise AttributeError(name)  # not initialised yet (copy/pickle protocols): never recurse
        return getattr(self.model, name)

    def __setattr__(self, name, value):
        setattr(self.model, name, value)  # e.g. trainers swapping model.denoiser for a frozen copy

    def __copy__(self) -> StagedModel:
        """A shallow copy wraps a shallow copy of the model, so setting attributes on it (e.g. a merged
        denoiser before saving) leaves the original untouched."""
        import copy

        new = object.__new__(StagedModel)
        object.__setattr__(new, "model", copy.copy(self.model))
        object.__setattr__(new, "stages", self.stages)
        object.__setattr__(new, "_positions", self._positions)
        return new

    def fraction(self, t) -> float:
        """Chain-position fraction in [0, 1) of timestep ``t`` (0 = first, noisiest step)."""
        tf = float(t if not isinstance(t, torch.Tensor) else t.flatten()[0])
        if self._positions is not None:
            key = round(tf, 3)
            if key in self._positions:
                return self._positions[key]
            near = min(self._positions, key=lambda k: abs(k - tf))
            if abs(near - tf) < 1:
                return self._positions[near]
        return 1.0 - tf / self.model.scheduler.config.num_train_timesteps

    def stage_conditions(self, cond: Conditions) -> dict[str, Conditions]:
        n = len(cond.prompts) if cond.prompts is not None else (
            len(cond.labels) if cond.labels is not None else 1)
        out = {}
        for stage in STAGES:
            prompts = self.stages.prompts_for(stage, cond.prompts, n)
            out[stage] = Conditions(labels=cond.labels, prompts=prompts, guidance_scale=cond.guidance_scale,
                                    extra=dict(cond.extra), control=cond.control)
        return out

    def denoise_fn(self, cond: Conditions, encoded=None):
        conds = self.stage_conditions(cond)
        fns = {stage: self.model.denoise_fn(c) for stage, c in conds.items()}

        def fn(x, t):
            return fns[self.stages.stage_of_fraction(self.fraction(t))](x, t)

        return fn
