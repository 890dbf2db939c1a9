"""The layout is the architecture: import boundaries, no import cycle, pinned kit surface.

Imports are read from the source with ``ast`` (every import statement, including
those under ``if TYPE_CHECKING:`` and inside functions), so a cycle cannot hide behind
a lazy or type-only import.
"""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import crystallize
import crystallize.backend

ROOT = Path(__file__).resolve().parent.parent

BACKEND_PUBLIC = [
    "GRACE_SECONDS",
    "WAIT_SLICE_SECONDS",
    "ConfigurationError",
    "ExecutionBackend",
    "RunResult",
    "RunSpec",
    "RunnableExperiment",
    "SetUpSteps",
    "StepCall",
    "StepEffects",
    "StepInvoker",
    "WorkerCrashedError",
    "acall_step",
    "aexecute_run",
    "batched",
    "call_step",
    "check_option",
    "default_cache_store",
    "deserialize_experiment",
    "deserialize_step",
    "execute_run",
    "failed_run",
    "host_steps",
    "is_int",
    "is_interrupt",
    "is_seconds",
    "pack_results",
    "resolve_cache",
    "running_step",
    "serialize_experiment",
    "serialize_step",
    "steps_set_up",
    "timed_out",
    "unpack_results",
    "worker_died",
]


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """Absolute names of every module ``path`` imports (relative imports resolved)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    module = _module_name(path)
    parent = module if path.stem == "__init__" else module.rsplit(".", 1)[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = parent.rsplit(".", node.level - 1)[0] if node.level > 1 else parent
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module or ""
            found.add(target)
            # `from . import x` / `from .pkg import mod` may name submodules
            for alias in node.names:
                candidate = f"{target}.{alias.name}"
                as_path = ROOT / Path(*candidate.split("."))
                if as_path.with_suffix(".py").exists() or (as_path / "__init__.py").exists():
                    found.add(candidate)
    return found


def _graph(package: str) -> dict[str, set[str]]:
    """Every module of ``package``, subpackages included, and the modules of it each imports."""
    modules = {_module_name(p): p for p in (ROOT / package).rglob("*.py")}
    return {name: {dep for dep in _imports(path) if dep in modules and dep != name} for name, path in modules.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path of module names, or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                return stack[stack.index(dep) :] + [dep]
            if dep not in state:
                found = visit(dep)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def _node(module: str) -> str:
    parts = module.split(".")
    return ".".join(parts[:2])


def test_the_core_has_no_import_cycle_not_even_type_only():
    # A subpackage (crystallize.stores) is one concept and one node here: its modules
    # may refer to each other lazily, but nothing outside it may form a cycle with it.
    # The package __init__ files only re-export; cycles through them are not design.
    graph: dict[str, set[str]] = {}
    for name, deps in _graph("crystallize").items():
        node = _node(name)
        graph.setdefault(node, set()).update(_node(d) for d in deps)
    graph.pop("crystallize", None)
    for node, deps in graph.items():
        deps.discard("crystallize")
        deps.discard(node)
    assert _cycle(graph) is None, " -> ".join(_cycle(graph) or [])


def test_the_cycle_check_can_fail():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_crystallize_ray_imports_only_the_public_core_and_the_kit():
    allowed = {"crystallize", "crystallize.backend"}
    offenders = {}
    for path in (ROOT / "crystallize_ray").rglob("*.py"):
        core = {m for m in _imports(path) if m.split(".")[0] == "crystallize"} - allowed
        if core:
            offenders[path.name] = sorted(core)
    assert offenders == {}


def test_the_core_never_imports_ray():
    for path in (ROOT / "crystallize").rglob("*.py"):
        assert not any(m.split(".")[0] == "ray" for m in _imports(path)), path.name


def test_the_backend_kit_surface_is_pinned_and_sorted():
    assert crystallize.backend.__all__ == BACKEND_PUBLIC
    assert all(hasattr(crystallize.backend, name) for name in BACKEND_PUBLIC)


def test_every_exported_exception_derives_from_crystallize_error():
    exported = [getattr(crystallize, n) for n in crystallize.__all__]
    exported += [getattr(crystallize.backend, n) for n in crystallize.backend.__all__]
    errors = [obj for obj in exported if inspect.isclass(obj) and issubclass(obj, BaseException)]
    assert len(errors) >= 12
    assert [e.__name__ for e in errors if not issubclass(e, crystallize.CrystallizeError)] == []
    assert issubclass(crystallize.ConfigurationError, ValueError)


def test_execution_backend_is_abstract():
    class NoExecute(crystallize.backend.ExecutionBackend):
        pass

    try:
        NoExecute()
    except TypeError as exc:
        assert "execute" in str(exc)
    else:
        raise AssertionError("a backend without execute() was instantiated")
