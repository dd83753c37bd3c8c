"""The runtime's shape, read from its source: no import cycle between its modules (type-checking
imports included), and no private name taken from another module."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: Where each runtime package lives (the integrations' in their distributions' folders).
PACKAGES = {"mlpm_guard": ROOT / "mlpm_guard",
            "langchain_mlpm_guard": ROOT / "integrations" / "langchain-mlpm-guard" / "langchain_mlpm_guard",
            **{f"llama_index.{kind}.mlpm_guard": ROOT / "integrations" / f"llama-index-{kind}-mlpm-guard" / "llama_index"
               / kind / "mlpm_guard" for kind in ("llms", "postprocessor", "embeddings")},
            "llama_index_mlpm_guard": ROOT / "integrations" / "llama-index-llms-mlpm-guard" / "llama_index_mlpm_guard"}


def runtime_modules() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the runtime packages."""
    out = {}
    for package, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            parts = (package, *path.relative_to(folder).with_suffix("").parts)
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


MODULES = runtime_modules()


def _imports(name: str, path: Path) -> Iterator[tuple[ast.ImportFrom | ast.Import, str]]:
    """Every import statement of a module (functions and ``TYPE_CHECKING`` blocks included), with
    the module it names, made absolute."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                yield node, ".".join([*base, *([node.module] if node.module else [])])
            else:
                yield node, node.module or ""


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> the runtime modules it imports (``from package import module`` names the module)."""
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets = set()
        for node, module in _imports(name, path):
            names = [a.name for a in node.names] if isinstance(node, ast.ImportFrom) else []
            for target in [f"{module}.{n}" for n in names if f"{module}.{n}" in modules] or [module]:
                if target in modules and target != name:
                    targets.add(target)
        graph[name] = targets
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_walk_sees_every_package_and_finds_a_cycle_when_there_is_one():
    assert {"mlpm_guard.guardrail.guard", "mlpm_guard.server.proxy", "langchain_mlpm_guard.middleware",
            "llama_index.llms.mlpm_guard.engine", "llama_index.postprocessor.mlpm_guard.base",
            "llama_index.embeddings.mlpm_guard.base", "llama_index_mlpm_guard"} <= set(MODULES)
    graph = import_graph(MODULES)
    assert "mlpm_guard.guardrail.pipeline" in graph["mlpm_guard.guardrail.guard"]
    assert cycles({**graph, "mlpm_guard.vocabulary.types": graph["mlpm_guard.vocabulary.types"] | {"mlpm_guard.guardrail.guard"}})


def test_the_runtime_has_no_import_cycle():
    assert cycles(import_graph(MODULES)) == []


def _private_names(name: str, path: Path) -> Iterator[str]:
    """``module: name`` for each private name this module takes from another runtime module: by
    ``from x import _name`` (a private submodule is a module, not a name), or as ``module._name``."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    bound_modules = {}
    for node, module in _imports(name, path):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name in MODULES:
                    bound_modules[alias.asname or alias.name] = alias.name
            continue
        if not any(module == p or module.startswith(f"{p}.") for p in PACKAGES):
            continue
        for alias in node.names:
            full = f"{module}.{alias.name}"
            if full in MODULES:
                bound_modules[alias.asname or alias.name] = full
            elif alias.name.startswith("_") and not alias.name.startswith("__"):
                yield f"{name}: {alias.name} from {module}"
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in bound_modules
                and node.attr.startswith("_") and not node.attr.startswith("__")):
            yield f"{name}: {bound_modules[node.value.id]}.{node.attr}"


def test_no_private_name_crosses_a_module_boundary():
    found = [hit for name, path in MODULES.items() for hit in _private_names(name, path)]
    assert found == []


@pytest.mark.parametrize("source,expected", [
    ("from ..estimator.prototypes import _same_weights\n", ["mlpm_guard.model.safety_prompt: _same_weights from mlpm_guard.estimator.prototypes"]),
    ("from ..estimator import prototypes\nprototypes._combine\n", ["mlpm_guard.model.safety_prompt: mlpm_guard.estimator.prototypes._combine"]),
    ("from ..estimator import _stats\nfrom .._io import atomic_write_text\n", []),
])
def test_the_private_name_check_reads_both_forms(tmp_path, source, expected):
    path = tmp_path / "safety_prompt.py"
    path.write_text(source, encoding="utf-8")
    assert list(_private_names("mlpm_guard.model.safety_prompt", path)) == expected


def _any_typed(path: Path) -> Iterator[str]:
    """``line: parameter`` for each ``backbone``/``prototypes`` parameter annotated ``Any``."""
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            args = node.args
            for arg in [*args.posonlyargs, *args.args, *args.kwonlyargs]:
                if arg.arg in ("backbone", "prototypes") and arg.annotation is not None \
                        and "Any" in ast.unparse(arg.annotation):
                    yield f"{node.lineno}: {node.name}({arg.arg}: {ast.unparse(arg.annotation)})"


def test_backbone_and_prototypes_parameters_have_real_types():
    found = {name: hits for name, path in MODULES.items() if (hits := list(_any_typed(path)))}
    assert found == {}
