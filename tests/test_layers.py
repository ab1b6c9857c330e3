"""The layers, checked from the source: imports point down only, frameworks stay in their backend, no cycles."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "mlx_lora"

# Lower numbers sit lower. A module may import its own package or anything with a lower number; packages that
# share a number are siblings and may not import each other (training and answer both build on backends/data).
LAYERS = {
    "core": 0,
    "data": 1,
    "backends": 2,
    "training": 3,
    "answer": 3,
    "evaluation": 4,
    "pipeline": 5,
    "export": 5,
    "doctor": 5,
    "serve": 5,
    "commands": 6,
    "cli": 6,
    "__main__": 7,  # python -m mlx_lora: above the command it runs
}
# Frameworks and the only package allowed to import each.
FRAMEWORKS = {
    "torch": "backends.torch",
    "transformers": "backends.torch",
    "peft": "backends.torch",
    "accelerate": "backends.torch",
    "mlx": "backends.mlx",
    "mlx_lm": "backends.mlx",
}


def modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


MODULES = modules()


def imports(name: str, path: Path) -> list[tuple[str, int]]:
    """(imported name relative to the package or a top-level library, line) for every import, lazy ones too."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = package.split(".") if package else []
                base = base[: len(base) - (node.level - 1)] if node.level > 1 else base
                target = ".".join(["mlx_lora", *base, *([node.module] if node.module else [])])
            else:
                target = node.module or ""
            for alias in node.names:  # `from pkg import module` imports that module
                full = f"{target}.{alias.name}"
                inner = full.removeprefix("mlx_lora.")
                out.append((full if inner in MODULES else target, node.lineno))
    return out


def internal(target: str) -> str | None:
    if target == "mlx_lora":
        return ""
    return target.removeprefix("mlx_lora.") if target.startswith("mlx_lora.") else None


def layer(name: str) -> tuple[str, int]:
    top = name.split(".")[0]
    assert top in LAYERS or name == "", f"mlx_lora.{name}: a module outside the known layers; add it to LAYERS"
    return top, LAYERS.get(top, -1)


def test_imports_point_down_only():
    wrong = []
    for name, path in MODULES.items():
        if name == "":
            continue
        top, rank = layer(name)
        for target, line in imports(name, path):
            inner = internal(target)
            if inner is None or inner == "":
                continue
            other, other_rank = layer(inner)
            if other != top and other_rank >= rank:
                wrong.append(
                    f"{path.relative_to(PACKAGE.parent)}:{line}: {top} (layer {rank}) imports "
                    f"mlx_lora.{inner} (layer {other_rank})"
                )
    assert not wrong, "\n".join(wrong)


def test_frameworks_are_imported_only_by_their_backend():
    wrong = []
    for name, path in MODULES.items():
        for target, line in imports(name, path):
            owner = FRAMEWORKS.get(target.split(".")[0])
            if owner and not (name == owner or name.startswith(owner + ".")):
                wrong.append(f"{path.relative_to(PACKAGE.parent)}:{line}: imports {target} (only {owner} may)")
    assert not wrong, "\n".join(wrong)


def test_no_import_cycles_not_even_lazy_ones():
    graph = {
        name: sorted({internal(t) for t, _ in imports(name, path)} - {None, name}) for name, path in MODULES.items()
    }
    # A package's __init__ is imported with any of its modules: that edge is Python's, not a design choice.
    graph = {name: [t for t in targets if not name.startswith(t + ".") and t != ""] for name, targets in graph.items()}
    cycles, state = [], {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = "open"
        for target in graph.get(node, []):
            if state.get(target) == "open":
                cycles.append(" → ".join(stack[stack.index(target) :] + [target]))
            elif target not in state:
                visit(target, stack + [target])
        state[node] = "done"

    for start in sorted(graph):
        if start not in state:
            visit(start, [start])
    assert not cycles, "\n".join(cycles)


@pytest.mark.parametrize("name", sorted(n for n in MODULES if n))
def test_every_module_says_what_it_is_for(name):
    doc = ast.get_docstring(ast.parse(MODULES[name].read_text(encoding="utf-8")))
    assert doc and doc.strip(), f"mlx_lora.{name}: add a one-line module docstring"
