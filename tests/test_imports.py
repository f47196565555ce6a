"""The package's import structure: no circle among its modules, and an import inside a function only where the
module it loads is slow or optional (torch and what imports it, diffusers, matplotlib, ...): the workflow imports the
registry, the schema and the layout every time it parses, and must not pay for those."""

import ast
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "diffattr"
# libraries loaded where they are used: slow to import (torch and its stack, plotting, Hydra's compose) or optional
DEFERRED_LIBRARIES = {"torch", "diffusers", "matplotlib", "sklearn", "scipy", "safetensors", "hydra",
                      "snakemake_executor_plugin_slurm"}


def _module_names() -> dict[str, Path]:
    names = {}
    for path in PACKAGE.rglob("*.py"):
        name = ".".join(("diffattr", *path.relative_to(PACKAGE).with_suffix("").parts))
        names[name.removesuffix(".__init__")] = path
    return names


MODULES = _module_names()


def _targets(module: str, node: ast.Import | ast.ImportFrom) -> list[str]:
    """What an import statement loads: package modules by their full names, libraries by their top-level name."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if node.level == 0:
        return [node.module]
    package = module if MODULES[module].name == "__init__.py" else module.rsplit(".", 1)[0]
    parts = package.split(".")[:len(package.split(".")) - node.level + 1]
    base = ".".join(parts + ([node.module] if node.module else []))
    return [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]


def _module_level_imports(body: list[ast.stmt]):
    """The import statements that run when the module is imported (not those under ``if TYPE_CHECKING``)."""
    for node in body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, ast.If):
            if "TYPE_CHECKING" not in ast.unparse(node.test):
                yield from _module_level_imports(node.body)
            yield from _module_level_imports(node.orelse)
        elif isinstance(node, ast.Try):
            for block in (node.body, node.orelse, node.finalbody, *(h.body for h in node.handlers)):
                yield from _module_level_imports(block)


def _graph():
    """module -> the package modules and the libraries it imports at module level (a submodule's parents too)."""
    modules, libraries = {}, {}
    for name, path in MODULES.items():
        modules[name], libraries[name] = set(), set()
        for node in _module_level_imports(ast.parse(path.read_text()).body):
            if isinstance(node, ast.ImportFrom) and node.module == "__future__":
                continue
            for target in _targets(name, node):
                if target.split(".")[0] != "diffattr":
                    libraries[name].add(target.split(".")[0])
                    continue
                parts = target.split(".")
                parents = {".".join(parts[:i]) for i in range(2, len(parts))}
                modules[name] |= {m for m in parents | {target} if m in MODULES and not name.startswith(m + ".")
                                  and m != name}
    return modules, libraries


def test_the_package_imports_without_a_circle():
    modules, _ = _graph()
    done, stack, circles = set(), [], []

    def visit(name):
        stack.append(name)
        for nxt in sorted(modules[name]):
            if nxt in stack:
                circles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt not in done:
                visit(nxt)
        stack.pop()
        done.add(name)

    for name in sorted(modules):
        if name not in done:
            visit(name)
    assert not circles, circles


def test_a_function_imports_only_what_is_slow_or_optional_to_load():
    modules, libraries = _graph()

    def deferred(target: str, seen: set) -> bool:
        if target not in MODULES:
            return target.split(".")[0] in DEFERRED_LIBRARIES
        if target in seen:
            return False
        seen.add(target)
        return bool(libraries[target] & DEFERRED_LIBRARIES) or any(deferred(m, seen) for m in modules[target])

    found = []
    for name, path in MODULES.items():
        for function in ast.walk(ast.parse(path.read_text())):
            if isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
                found += [f"{path.relative_to(PACKAGE)}:{node.lineno} {ast.unparse(node)}"
                          for node in ast.walk(function) if isinstance(node, (ast.Import, ast.ImportFrom))
                          and not all(deferred(t, set()) for t in _targets(name, node))]
    assert not found, "import these at the top of the module:\n" + "\n".join(found)


@pytest.mark.parametrize("module", ["diffattr.methods", "diffattr.settings", "diffattr.config", "diffattr.layout"])
def test_the_checks_see_the_imports(module):
    """The graph the tests walk holds what Python does: every module-level package import it lists is in
    ``sys.modules`` once the module is imported (a check the two tests above could otherwise pass vacuously)."""
    __import__(module)
    modules, _ = _graph()
    assert modules[module], module
    assert all(m in sys.modules for m in modules[module]), sorted(modules[module] - set(sys.modules))
