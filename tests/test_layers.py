"""The package's layout holds: no import circles, lower layers import no trainer or CLI, imports at the top of
their modules (but for the CLI's lazy boundary), one lazy-export mechanism whose names exist, and one set of
estimator defaults for the CLI, config files and the Python API."""

from __future__ import annotations

import ast
import importlib
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "chaintune"

# bottom to top: a module may import its own layer or lower ones, never higher
LAYERS = [
    {"errors", "options", "_exports", "utils"},
    {"distributed", "adapters", "chain", "backends", "data", "classifiers", "metrics"},
    {"estimators", "rewards", "sampling", "prompts", "gradients", "diagnostics"},
    {"run"},
    {"align", "transfer", "controlnet", "pretrain", "plan"},
    {"cli", "testing"},  # testing builds tiny models of every kind, pretrained ones included, for the tests
]
LOWER = {"chain", "backends", "estimators", "rewards", "data"}  # the list: they import no trainer, no CLI
TRAINERS = {"run", "align", "transfer", "controlnet", "pretrain", "plan", "cli"}
# modules `chaintune --help` imports: they must stay torch-free, so their heavy imports wait inside functions
STARTUP = {"chaintune", "chaintune._exports", "chaintune.errors", "chaintune.options", "chaintune.run",
           "chaintune.run.config", "chaintune.align", "chaintune.align.config", "chaintune.pretrain",
           "chaintune.pretrain.config", "chaintune.transfer", "chaintune.transfer.config", "chaintune.controlnet",
           "chaintune.controlnet.config", "chaintune.estimators", "chaintune.estimators.options"}


def _modules() -> dict[str, Path]:
    out = {}
    for p in ROOT.rglob("*.py"):
        parts = p.relative_to(ROOT.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = p
    return out


MODULES = _modules()


def _targets(node: ast.AST, module: str, is_pkg: bool) -> set[str]:
    """The chaintune modules an import statement loads (``from pkg import sub`` counts as ``pkg.sub``)."""
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    else:
        base = node.module or ""
        if node.level:
            parts = module.split(".") if is_pkg else module.split(".")[:-1]
            base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
        subs = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in MODULES]
        names = subs + ([base] if len(subs) < len(node.names) else [])
    out = set()
    for n in names:
        while n and n not in MODULES:
            n = n.rpartition(".")[0]
        if n and n != module and n.startswith("chaintune"):
            out.add(n)
    return out


def _graph() -> tuple[dict[str, set[str]], dict[str, list[tuple[int, str]]]]:
    """Every import edge, and the imports of chaintune modules that sit inside functions (line, target)."""
    edges: dict[str, set[str]] = {m: set() for m in MODULES}
    nested: dict[str, list[tuple[int, str]]] = {}
    for m, p in MODULES.items():
        tree = ast.parse(p.read_text())
        # module level: the body, and the body of a top-level `if` (TYPE_CHECKING, __main__)
        top = {id(n) for n in tree.body} | {id(n) for s in tree.body if isinstance(s, ast.If) for n in s.body}
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                got = _targets(node, m, p.name == "__init__.py")
                edges[m] |= got
                if got and id(node) not in top:
                    nested.setdefault(m, []).extend((node.lineno, t) for t in sorted(got))
    for m, p in MODULES.items():  # the lazy exports are edges too (they import when a name is read)
        if "lazy(" in p.read_text():
            for target in _lazy_exports(p).values():
                edges[m].add(target)
    return edges, nested


def _lazy_exports(path: Path) -> dict[str, str]:
    """name -> module of a package's ``__getattr__ = lazy(__name__, {...})`` (literal dicts only)."""
    mod = importlib.import_module(".".join(path.relative_to(ROOT.parent).with_suffix("").parts[:-1]))
    fn = getattr(mod, "__getattr__", None)
    mapping = fn.__closure__[0].cell_contents if fn is not None and fn.__closure__ else {}
    return dict(mapping)


def _top(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "chaintune"


def _layer(module: str) -> int | None:
    top = _top(module)
    return next((i for i, layer in enumerate(LAYERS) if top in layer), None)


def test_no_import_circles():
    edges, _ = _graph()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    circles: list[list[str]] = []
    sys.setrecursionlimit(10_000)

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                circles.append(sorted(comp))

    for v in edges:
        if v not in index:
            visit(v)
    assert not circles, f"import circles: {circles}"


def test_lower_layers_import_no_trainer_and_no_cli():
    edges, _ = _graph()
    upward = []
    for m, targets in edges.items():
        lm = _layer(m)
        for t in targets:
            lt = _layer(t)
            if m == "chaintune" or lm is None or lt is None:
                continue  # the top-level package's public names are the API, above every layer
            if lt > lm or (_top(m) in LOWER and _top(t) in TRAINERS):
                upward.append(f"{m} -> {t}")
    assert not upward, "lower layers import higher ones:\n" + "\n".join(sorted(upward))


def test_imports_are_at_module_top_except_the_lazy_boundary():
    _, nested = _graph()
    stray = [f"{m}:{line} imports {t}" for m, items in nested.items() for line, t in items
             if not (m.startswith("chaintune.cli") or m in STARTUP)]
    assert not stray, "imports inside functions (move them to the module's top):\n" + "\n".join(stray)


def test_help_imports_no_torch():
    import subprocess

    code = "import sys, chaintune.cli.main; print(sorted(m for m in sys.modules if m.split('.')[0] in " \
           "('torch', 'diffusers', 'transformers')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out


@pytest.mark.parametrize("path", sorted(p for p in MODULES.values() if "lazy(" in p.read_text()),
                         ids=lambda p: str(p.relative_to(ROOT.parent)))
def test_lazy_exports_name_what_exists(path):
    for name, module in _lazy_exports(path).items():
        assert hasattr(importlib.import_module(module), name), f"{module} has no {name}"


def test_the_api_and_the_cli_build_the_same_estimator_for_every_name():
    """`estimate_gradient(model, reward, E)` / `get_estimator(E)` and `chaintune align --estimator E` (its config)
    construct equal estimators: the defaults are declared once (chaintune.estimators.options)."""
    from chaintune.align.config import AlignConfig
    from chaintune.estimators import ESTIMATORS, get_estimator
    from chaintune.estimators.options import DEFAULTS
    from chaintune.estimators.registry import estimator_from_config

    def state(e):
        return type(e), {k: v for k, v in vars(e).items() if not k.startswith("_")}

    for name, cls in ESTIMATORS.items():
        api, cli = get_estimator(name), estimator_from_config(AlignConfig.from_dict({"estimator": name}))
        assert state(api) == state(cli), name
        for option in cls.options:  # every option an estimator takes is a config field, at the same default
            assert hasattr(DEFAULTS, option), (name, option)
    rlr = get_estimator("rlr")
    assert (rlr.h, rlr.zo, rlr.spans) == (DEFAULTS.h, DEFAULTS.zo, DEFAULTS.spans)


def test_each_estimator_option_names_its_estimators_and_they_take_exactly_those():
    """Declared once: an option's ``used_by`` is what the estimator's constructor receives (``takes``), what
    ``--help`` shows, and it names real estimators that accept it; the torch-free GROUPED agrees with the
    classes' own ``compares_group``."""
    import inspect
    from dataclasses import fields

    from chaintune.estimators import ESTIMATORS
    from chaintune.estimators.options import GROUPED, EstimatorConfig, takes
    from chaintune.options import specs

    names = {cls.name for cls in ESTIMATORS.values()}
    for f in fields(EstimatorConfig):
        assert set(f.metadata.get("used_by", ())) <= names, f.name  # no typo in an estimator's name
    for cls in ESTIMATORS.values():
        assert cls.options == takes(cls.name), cls.name
        params = set(inspect.signature(cls).parameters)
        assert set(cls.options) <= params, (cls.name, set(cls.options) - params)
    assert {cls.name for cls in ESTIMATORS.values() if cls.compares_group} == set(GROUPED)
    read = {o for cls in ESTIMATORS.values() for o in cls.options}
    unread = {s.name for s in specs(EstimatorConfig())} - read - {"estimator", "baseline"}
    assert not unread, f"options no estimator reads: {unread}"
