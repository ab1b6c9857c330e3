"""`mlx-lora bench`: find the engines, plan interleaved repetitions, run them in worker processes, write the report."""

from __future__ import annotations

import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from datetime import date
from pathlib import Path

from benchmarks import generation, measure, report, roofline
from mlx_lora.core.config import Config
from mlx_lora.core.errors import UserError

REPO = Path(__file__).resolve().parent.parent
OPENBLAS = Path("/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3")
ALL_BACKENDS = ("torch-cpu", "torch-cuda", "torch-mps", "mlx-metal", "mlx-cpu", "mlx-cpu+openblas", "mlx-cuda")
_PROBE = """
import importlib.util, json
out = {"torch": None, "mlx": None, "transformers": bool(importlib.util.find_spec("transformers")),
       "peft": bool(importlib.util.find_spec("peft")), "mlx_lm": bool(importlib.util.find_spec("mlx_lm"))}
if importlib.util.find_spec("torch"):
    import torch
    mps = getattr(torch.backends, "mps", None)
    out["torch"] = {"cuda": torch.cuda.is_available(), "mps": bool(mps and mps.is_available())}
if importlib.util.find_spec("mlx"):
    try:
        import mlx.core as mx
        cuda = getattr(mx, "cuda", None)
        out["mlx"] = {"metal": mx.metal.is_available(), "cuda": bool(cuda and cuda.is_available())}
    except Exception as exc:
        out["mlx_error"] = str(exc)
print(json.dumps(out))
"""


@dataclass
class Settings:
    """What one `bench` invocation measures; `quick` picks small defaults and groups tasks per process."""

    model: str = "tiny"
    backends: list[str] | None = None  # None: every available one
    quick: bool = False
    baselines: bool = True
    training: bool = True
    generation: bool = True
    roofline: bool = True
    reps: int | None = None
    warmup: int | None = None
    steps: dict[str, int] = field(default_factory=dict)  # {"": default, "mlx-cpu": 1, ...}
    gen_batch: int | None = None
    gen_tokens: int | None = None
    threads: int | None = None  # None: 1 in quick mode (small ops are erratic with more on a busy machine), else all
    isolate: bool | None = None  # one process per task (clean peak memory); default: not in quick mode
    out: Path | None = None
    data: Path | None = None
    adapter: Path | None = None  # generation with this run's adapter (ours and HF generate + PEFT)
    cpu_flags: list[str] = field(default_factory=list)  # filled by run_bench from the machine (bf16 units?)

    def resolved(self) -> Settings:
        quick = self.quick
        defaults = {
            "reps": 2 if quick else 3,
            "warmup": 1 if quick else 2,
            "gen_batch": 4 if quick else 8,
            "gen_tokens": 8 if quick else 32,
            "isolate": not quick,
            "threads": 1 if quick else os.cpu_count() or 1,
        }
        for key, value in defaults.items():
            if getattr(self, key) is None:
                setattr(self, key, value)
        self.steps.setdefault("", 2 if quick else 8)
        return self

    def steps_for(self, engine: str) -> int:
        return self.steps.get(engine, self.steps[""])


@dataclass
class Engine:
    name: str  # torch-cpu, mlx-cpu+openblas, ...
    backend: str  # torch | mlx
    device: str  # cpu | cuda | mps | gpu
    blas: str | None = None
    env: dict = field(default_factory=dict)


def probe() -> dict:
    """Which frameworks and devices exist, asked in a child process (importing torch here would cost seconds)."""
    done = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        raise UserError(f"bench: probing the installed frameworks failed: {done.stderr.strip().splitlines()[-1:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def available_engines(found: dict) -> dict[str, Engine]:
    engines: dict[str, Engine] = {}
    torch = found.get("torch")
    if torch and found.get("transformers") and found.get("peft"):
        engines["torch-cpu"] = Engine("torch-cpu", "torch", "cpu")
        if torch["cuda"]:
            engines["torch-cuda"] = Engine("torch-cuda", "torch", "cuda")
        if torch["mps"]:
            engines["torch-mps"] = Engine("torch-mps", "torch", "mps")
    mlx = found.get("mlx")
    if mlx and found.get("mlx_lm"):
        linux = sys.platform.startswith("linux")
        engines["mlx-cpu"] = Engine("mlx-cpu", "mlx", "cpu", "reference" if linux else "accelerate")
        if linux and OPENBLAS.is_file():  # mlx-cpu links the reference BLAS on Linux; Debian's OpenBLAS fixes it
            engines["mlx-cpu+openblas"] = Engine(
                "mlx-cpu+openblas", "mlx", "cpu", "openblas", {"LD_PRELOAD": str(OPENBLAS)}
            )
        if mlx["metal"]:
            engines["mlx-metal"] = Engine("mlx-metal", "mlx", "gpu")
        if mlx["cuda"]:
            engines["mlx-cuda"] = Engine("mlx-cuda", "mlx", "gpu")
    return engines


def choose(engines: dict[str, Engine], wanted: list[str] | None) -> list[Engine]:
    if not wanted:
        if not engines:
            raise UserError("bench: no backend is usable here; pip install -e '.[torch]' or '.[mlx]'")
        return [engines[n] for n in ALL_BACKENDS if n in engines]
    unknown = [n for n in wanted if n not in ALL_BACKENDS]
    if unknown:
        raise UserError(f"--backends: unknown {', '.join(unknown)}; choose from {', '.join(ALL_BACKENDS)}")
    missing = [n for n in wanted if n not in engines]
    if missing:
        have = ", ".join(engines) or "none"
        raise UserError(f"--backends: {', '.join(missing)} not available on this machine (available: {have})")
    return [engines[n] for n in wanted]


def plan(engines: list[Engine], s: Settings) -> list[dict]:
    """Every task in run order: repetitions interleaved across engines (A B A B), baselines next to theirs."""
    tasks: list[dict] = []
    for rep in range(s.reps if s.training else 0):
        for e in engines:
            base = {"engine": e.name, "backend": e.backend, "device": e.device, "blas": e.blas, "rep": rep}
            train = {**base, "suite": "training", "steps": s.steps_for(e.name), "warmup": s.warmup}
            bf16 = e.backend == "torch" and bf16_units(e, s.cpu_flags)
            tasks.append({**train, "impl": "ours", "precision": "fp32"})
            if bf16:
                tasks.append({**train, "impl": "ours-bf16", "precision": "bf16"})
            if s.baselines and e.backend == "torch":
                tasks.append({**train, "impl": "hf-trainer", "precision": "fp32"})
                # The well-configured Trainer, in each precision a user would pick here.
                tasks.append({**train, "impl": "hf-trainer-tuned", "precision": "fp32"})
                if bf16:
                    tasks.append({**train, "impl": "hf-trainer-tuned-bf16", "precision": "bf16"})
            elif s.baselines:
                tasks.append({**train, "impl": "mlx-lm"})
    if s.generation:
        for rep in range(s.reps):
            for e in engines:
                base = {
                    "engine": e.name,
                    "backend": e.backend,
                    "device": e.device,
                    "blas": e.blas,
                    "rep": rep,
                    "suite": "generation",
                    "batch": s.gen_batch,
                    "new_tokens": s.gen_tokens,
                    **({"adapter": str(s.adapter)} if s.adapter else {}),
                }
                # Each precision against HF generate in the same one: generate.precision would otherwise pick bf16
                # for ours alone on a CPU with bf16 units.
                bf16 = e.backend == "torch" and bf16_units(e, s.cpu_flags)
                for suffix, precision in [("", "fp32")] + ([("-bf16", "bf16")] if bf16 else []):
                    tasks.append({**base, "impl": "ours" + suffix, "precision": precision})
                    if s.baselines and e.backend == "torch":
                        tasks.append({**base, "impl": "hf-generate" + suffix, "precision": precision})
    if s.roofline:
        reps = 2 if s.quick else 5
        for e in engines:
            base = {
                "engine": e.name,
                "backend": e.backend,
                "device": e.device,
                "blas": e.blas,
                "suite": "roofline",
                "impl": "matmul",
                "reps": reps,
                "framework": e.backend,
                "budget_s": 1.0 if s.quick else 3.0,
            }
            if e.backend == "torch" and e.device == "cpu":
                for threads in sorted({1, s.threads}):
                    for dtype in ("float32", "bfloat16"):
                        tasks.append({**base, "n": 2048, "dtype": dtype, "threads": threads})
            else:  # mlx on CPU or GPU, torch on a GPU: sizes shrink where one product would exceed the budget
                for dtype in ("float32", "bfloat16"):
                    tasks.append({**base, "n": 4096 if e.device != "cpu" else 2048, "dtype": dtype, "threads": None})
    return tasks


def bf16_units(engine: Engine, flags: list[str]) -> bool:
    """Whether bf16 training is worth measuring on this engine: any CUDA GPU, or a CPU with bf16 instructions
    (avx512_bf16 or AMX); AVX2-only CPUs emulate bf16 (7-10x slower than fp32 measured), so they are skipped."""
    if engine.device == "cuda":
        return True
    return engine.device == "cpu" and any(f in flags for f in ("avx512_bf16", "amx_bf16"))


def processes(tasks: list[dict], engines: list[Engine], isolate: bool) -> list[tuple[Engine, list[dict]]]:
    """Isolated: one process per task, in plan order. Grouped: one process per engine (its tasks in order)."""
    by_name = {e.name: e for e in engines}
    if isolate:
        return [(by_name[t["engine"]], [t]) for t in tasks]
    grouped = [(e, [t for t in tasks if t["engine"] == e.name]) for e in engines]
    return [(e, group) for e, group in grouped if group]


def prepare_data(s: Settings, work: Path) -> Path:
    """The benchmark's data: --data, else `mlx-lora data build` from the repository's data/ (same for all engines)."""
    if s.data is not None:
        if not (s.data / "train.jsonl").is_file():
            raise UserError(f"{s.data}: no train.jsonl; pass a folder built by `mlx-lora data build`")
        return s.data
    from mlx_lora.data.dataset import build_data

    cfg = Config()
    for key in ("kb", "questions"):
        path = Path(getattr(cfg.data, key))
        if not path.is_file() and (REPO / path).is_file():
            setattr(cfg.data, key, str(REPO / path))
    cfg.data.dir = str(work / "data")
    build_data(cfg.data)
    return work / "data"


def prepare_model(spec: str, data_dir: Path) -> tuple[str, Path]:
    if spec == "tiny":
        from benchmarks import tiny
        from mlx_lora.core.model_store import default_cache_dir

        return "tiny", tiny.build(default_cache_dir() / "bench" / "tiny-qwen2", data_dir)
    from mlx_lora.core.model_store import resolve_model

    resolved = resolve_model(spec)
    if not isinstance(resolved, Path) or not (resolved / "config.json").is_file():
        raise UserError(f"--model {spec}: not a local model folder (run `mlx-lora model prepare` for embedded)")
    return ("embedded" if spec == "embedded" else resolved.name), resolved


def default_out(model_label: str, quick: bool) -> Path:
    machine = f"{platform.system().lower()}-{platform.machine()}-{os.cpu_count()}cpu"
    name = f"{date.today().isoformat()}-{machine}-{model_label}" + ("-quick" if quick else "")
    return REPO / "benchmarks" / "results" / name


def run_bench(s: Settings, cfg: Config | None = None, progress: bool = True) -> Path:
    """Measure, then write rows.jsonl, results.json, report.md and chart.png; returns the output folder."""
    s = s.resolved()
    cfg = cfg or Config()
    started = time.time()
    hardware = measure.hardware()  # before the run: the load average says how busy the machine was
    engines = choose(available_engines(probe()), s.backends)
    s.cpu_flags = list(hardware.get("cpu_flags") or [])
    work = Path(tempfile.mkdtemp(prefix="mlx-lora-bench-"))
    try:
        data_dir = prepare_data(s, work)
        label, model_dir = prepare_model(s.model, data_dir)
        out = Path(s.out) if s.out else default_out(label, s.quick)
        out.mkdir(parents=True, exist_ok=True)
        rows_path = out / "rows.jsonl"
        if rows_path.exists():
            rows_path.unlink()  # a new run replaces the folder's rows
        (out / "logs").mkdir(exist_ok=True)
        tasks = plan(engines, s)
        common = {"model": label, "threads": s.threads, "isolated": s.isolate}
        groups = processes(tasks, engines, s.isolate)
        for k, (engine, group) in enumerate(groups, 1):
            spec = {
                "model_dir": str(model_dir),
                "data_dir": str(data_dir),
                "threads": s.threads,
                "config": cfg.to_dict(),
                "common": common,
                "tasks": group,
            }
            spec_path = work / f"spec-{k}.json"
            spec_path.write_text(json.dumps(spec, ensure_ascii=False), encoding="utf-8")
            env = {
                **os.environ,
                "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
                "OMP_NUM_THREADS": str(s.threads),
                "OPENBLAS_NUM_THREADS": str(s.threads),
                "MKL_NUM_THREADS": str(s.threads),
                "TOKENIZERS_PARALLELISM": "false",
                **engine.env,
            }
            what = ", ".join(sorted({f"{t['suite']}/{t['impl']}" for t in group}))
            tic = time.perf_counter()
            with (out / "logs" / f"{k:03d}-{engine.name}.log").open("w") as log:
                code = subprocess.run(
                    [sys.executable, "-m", "benchmarks.worker", str(spec_path), str(rows_path)],
                    cwd=REPO,
                    env=env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                ).returncode
            if progress:
                status = "ok" if code == 0 else f"exit {code}, see logs/{k:03d}-{engine.name}.log"
                print(
                    f"[{k}/{len(groups)}] {engine.name}: {what} ({time.perf_counter() - tic:.1f} s, {status})",
                    file=sys.stderr,
                )
        rows = [json.loads(line) for line in rows_path.read_text(encoding="utf-8").splitlines() if line.strip()]
        meta = {
            "date": date.today().isoformat(),
            "command": "mlx-lora " + shlex.join(sys.argv[1:]),
            "source": _source(),
            "settings": _settings_dict(s),
            "hardware": hardware,
            "versions": measure.versions(),
            "threads": s.threads,
            "engines": [asdict(e) for e in engines],
            "model": {"label": label, "path": str(model_dir), "shape": _shape(model_dir)},
            "data": _data_stats(data_dir, model_dir, cfg, s.data),
            "config": cfg.to_dict(),
            "flops_formula": roofline.FORMULA,
            "generation_method": generation.METHOD,
            "wall_s": time.time() - started,
            "load_average_at_end": list(os.getloadavg()),
        }
        report.write(out, rows, meta)
        return out
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _source() -> str | None:
    """The commit measured (and whether the tree had local edits), when run from a git checkout."""
    try:
        head = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10
        )
        dirty = subprocess.run(
            ["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if head.returncode != 0:
        return None
    return head.stdout.strip() + (" (with uncommitted edits)" if dirty.stdout.strip() else "")


def _settings_dict(s: Settings) -> dict:
    d = asdict(s)
    d["out"] = str(d["out"]) if d["out"] else None
    d["data"] = str(d["data"]) if d["data"] else None
    d["adapter"] = str(d["adapter"]) if d["adapter"] else None
    return d


def _shape(model_dir: Path) -> dict:
    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    shape = roofline.model_shape(config)
    return {
        k: config.get(k)
        for k in (
            "hidden_size",
            "num_hidden_layers",
            "intermediate_size",
            "num_attention_heads",
            "num_key_value_heads",
            "vocab_size",
            "tie_word_embeddings",
        )
    } | {"n_frozen_linear": shape["n_frozen"], "n_head": shape["n_head"]}


def _data_stats(data_dir: Path, model_dir: Path, cfg: Config, given: Path | None) -> dict:
    """Where the rows came from, and their token counts under this model's tokenizer."""
    from mlx_lora.data.formats import encode_all, read_examples
    from mlx_lora.data.render import ChatTokenizer

    out = {"source": str(given) if given else "data/ via `mlx-lora data build` (default seed)"}
    stats = data_dir / "stats.json"
    if stats.is_file():
        splits = json.loads(stats.read_text(encoding="utf-8")).get("splits", {})
        out["rows"] = {name: s.get("rows") for name, s in splits.items()}
    rows, dropped = encode_all(
        ChatTokenizer.from_dir(model_dir), read_examples(data_dir / "train.jsonl"), cfg.train.max_length
    )
    if rows:
        out["train_tokens_per_row"] = round(sum(len(r.ids) for r in rows) / len(rows), 1)
        out["train_supervised_per_row"] = round(sum(r.supervised for r in rows) / len(rows), 1)
        out["train_rows_dropped_by_max_length"] = dropped
    return out
