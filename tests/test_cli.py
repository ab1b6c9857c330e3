"""The CLI: help lists every command, bad input is one line + non-zero exit, and the core imports no torch/mlx."""

import os
import subprocess
import sys
import textwrap

import pytest
from conftest import REPO, run_cli

COMMANDS = [
    "data",
    "train",
    "generate",
    "eval",
    "rules",
    "adapter",
    "fuse",
    "bench",
    "run",
    "diagnose",
    "model",
    "doctor",
    "serve",
]


cli = run_cli


def test_help_lists_every_command():
    out = cli("--help")
    assert out.returncode == 0
    for name in COMMANDS:
        assert f"\n  {name} " in out.stdout


HEAVY_BLOCKER = textwrap.dedent("""
    import sys
    for name in ("torch", "mlx", "mlx_lm", "transformers", "peft", "sentence_transformers"):
        sys.modules[name] = None  # importing any of them now raises ImportError
    from mlx_lora.cli import main
    main()
""")


@pytest.mark.parametrize(
    "args",
    [
        ["--help"],
        ["data", "build", "--out", "{tmp}/d"],
        ["data", "check", "{tmp}/d/train.jsonl"],
    ],
)
def test_help_and_data_commands_never_import_torch_or_mlx(tmp_path, args):
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    if args[:2] == ["data", "check"]:
        assert cli("data", "build", "--out", str(tmp_path / "d")).returncode == 0
    out = subprocess.run(
        [sys.executable, "-c", HEAVY_BLOCKER, *args], capture_output=True, text=True, cwd=REPO, timeout=120
    )
    assert out.returncode == 0, out.stderr


def test_core_modules_import_without_heavy_libraries():
    code = HEAVY_BLOCKER.replace("from mlx_lora.cli import main\nmain()", "") + textwrap.dedent("""
        import importlib, pkgutil, mlx_lora
        for info in pkgutil.walk_packages(mlx_lora.__path__, "mlx_lora."):
            # the two backend packages are the only ones allowed to import their libraries
            if not info.name.startswith(("mlx_lora.backends.mlx", "mlx_lora.backends.torch")):
                importlib.import_module(info.name)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr


@pytest.mark.parametrize(
    "files, args, needle",
    [
        (
            {"kb.jsonl": '{"doc_id": "a", "text": "x"}\n{oops\n'},
            ["data", "build", "--kb", "{tmp}/kb.jsonl"],
            "kb.jsonl:2: malformed JSON",
        ),
        ({"c.yaml": "train:\n  lrr: 1\n"}, ["data", "build", "-c", "{tmp}/c.yaml"], "unknown config key train.lrr"),
        ({"c.yaml": "train: [\n"}, ["data", "build", "-c", "{tmp}/c.yaml"], "c.yaml:"),
        ({}, ["data", "build", "--set", "data.seed=abc"], "data.seed: expected int"),
        ({}, ["data", "check", "{tmp}/missing.jsonl"], "missing.jsonl: file not found"),
        ({}, ["data", "build", "--kb", "{tmp}"], "is a directory, not a JSONL file"),
        (
            {
                "m.jsonl": '{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], '
                '"meta": "x"}\n'
            },
            ["data", "check", "{tmp}/m.jsonl"],
            'm.jsonl:1: "meta" must be an object',
        ),
        (
            {"q.yaml": 'refusal: "x"\ndocs:\n  ghost:\n    short: ["a"]\n'},
            ["data", "build", "--questions", "{tmp}/q.yaml"],
            "q.yaml:3: doc_id 'ghost' is not in the knowledge base",
        ),
        (
            {},
            ["data", "build", "--format", "xml"],
            "'xml' is not one of 'messages', 'text'. (see mlx-lora data build --help)",
        ),
        ({}, ["data", "build", "--set", "train.schedule=foo"], "train.schedule: 'foo' is not one of cosine"),
        ({"q.yaml": 'refusal: "\xe9"\n'}, ["data", "build", "--questions", "{tmp}/q.yaml"], "q.yaml:1: not UTF-8"),
    ],
)
def test_bad_input_is_one_line_without_traceback(tmp_path, files, args, needle):
    for name, text in files.items():
        (tmp_path / name).write_bytes(text.encode("latin-1" if name == "q.yaml" and "\xe9" in text else "utf-8"))
    out = cli(*[a.replace("{tmp}", str(tmp_path)) for a in args])
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], out.stderr


def test_a_failed_build_keeps_the_previous_files(tmp_path):
    assert cli("data", "build", "--out", str(tmp_path / "d")).returncode == 0
    before = (tmp_path / "d" / "train.jsonl").read_bytes()
    (tmp_path / "bad.yaml").write_text("refusal: [\n", encoding="utf-8")
    assert cli("data", "build", "--out", str(tmp_path / "d"), "--questions", str(tmp_path / "bad.yaml")).returncode == 2
    assert (tmp_path / "d" / "train.jsonl").read_bytes() == before
    # The four files change together: d links to a new generation folder, the old one is gone (tests/test_crash.py
    # kills the build at every step).
    assert cli("data", "build", "--out", str(tmp_path / "d"), "--seed", "7").returncode == 0
    assert (tmp_path / "d" / "train.jsonl").read_bytes() != before
    assert os.readlink(tmp_path / "d") == ".d.gen-2" and sorted(p.name for p in tmp_path.iterdir()) == [
        ".d.gen-2",
        "bad.yaml",
        "d",
    ]
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == [
        "stats.json",
        "test.jsonl",
        "train.jsonl",
        "valid.jsonl",
    ]  # no temp file left behind


def test_doctor_reports_backends_and_blas():
    out = cli("doctor")
    assert out.returncode == 0
    assert "backend torch" in out.stdout and "backend mlx" in out.stdout and "versions" in out.stdout
    if sys.platform.startswith("linux"):
        assert "mlx BLAS" in out.stdout
