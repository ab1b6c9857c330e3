"""`mlx-lora bench --serve`: concurrent openai clients against `mlx-lora serve` on 127.0.0.1 (latency, batching)."""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

from mlx_lora.core.config import Config
from mlx_lora.core.errors import UserError


@dataclass
class ServeBench:
    """One load test: `clients` threads, each with its own openai client, ask until `requests` answers or `seconds`."""

    adapter: Path | None = None  # a run folder; None: a tiny random model trained 2 steps here (say so in reports)
    model: str = "tiny"  # the base model of that tiny run: tiny | embedded | an HF folder
    clients: int = 8
    requests: int = 64
    seconds: float = 120.0
    max_batch: int = 8
    window_ms: float = 15.0
    max_tokens: int | None = None  # default: the config's generate.max_new_tokens
    out: Path | None = None


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 1)


def tiny_run(model: str, cfg: Config, work: Path) -> Path:
    """A run folder to serve when none is given: the sample KB's splits, `model`, 2 training steps."""
    from benchmarks.run import Settings, prepare_data, prepare_model
    from mlx_lora.training.run import train_run

    data = prepare_data(Settings(), work)
    _, model_dir = prepare_model(model, data)
    cfg.model.path = str(model_dir)
    cfg.train.max_steps, cfg.train.batch_size, cfg.train.grad_accum = 2, 4, 1
    train_run(cfg, data, work / "run", progress=False)
    return work / "run"


def _questions(adapter: Path) -> list[str]:
    """The run's held-out questions (test, then valid split): what users would ask, never trained on."""
    from mlx_lora.answer.service import train_file
    from mlx_lora.data.formats import read_examples

    folder = train_file(Config(), adapter).parent
    found = []
    for name in ("test.jsonl", "valid.jsonl"):
        if (folder / name).is_file():
            found += [e.question for e in read_examples(folder / name)]
    if not found:
        raise UserError(f"{adapter}: its manifest names no data folder with test.jsonl or valid.jsonl to ask")
    return found


class _Server:
    def __init__(self, service):
        from mlx_lora.serve.server import bind, uvicorn_server

        sock = bind("127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self.server = uvicorn_server(service)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.02)

    def close(self):
        self.server.should_exit = True
        self.thread.join(timeout=30)


def run_serve_bench(b: ServeBench, cfg: Config) -> dict:
    import openai

    from mlx_lora.serve.service import ServeSettings, Service

    work = Path(tempfile.mkdtemp(prefix="mlx-lora-serve-bench-"))
    adapter = b.adapter
    note = None
    if adapter is None:
        adapter = tiny_run(b.model, cfg, work)
        note = (
            f"a {b.model} model trained 2 steps here (no --adapter given): figures show the server, not answer quality"
        )
    settings = ServeSettings(max_batch=b.max_batch, window_ms=b.window_ms, audit_path=str(work / "audit.jsonl"))
    rules = cfg.rules.path if cfg.rules.path and Path(cfg.rules.path).is_file() else None
    service = Service(cfg, str(adapter), None, rules, settings, progress=False)
    started = time.perf_counter()
    service.start()
    load_s = time.perf_counter() - started
    server = _Server(service)
    max_tokens = b.max_tokens or service.cfg.generate.max_new_tokens  # the run's budget, as the server resolved it
    questions = _questions(adapter)
    settled = service.answering.settled(questions)
    needs_model = [q for q, d in zip(questions, settled) if d is None]

    def client():
        return openai.OpenAI(base_url=f"{server.url}/v1", api_key="bench", max_retries=0, timeout=600)

    def ask(c, question):
        t = time.perf_counter()
        r = c.chat.completions.create(
            model=service.name, messages=[{"role": "user", "content": question}], max_tokens=max_tokens, temperature=0
        )
        return (time.perf_counter() - t) * 1000, r.model_extra["mlx_lora"]["request_id"]

    result: dict = {"adapter": str(adapter), "note": note, "load_s": round(load_s, 1), "settings": asdict(b)}
    result["settings"]["adapter"] = str(adapter)
    result["settings"]["out"] = str(b.out) if b.out else None
    result["questions"] = {"held_out": len(questions), "need_the_model": len(needs_model)}
    try:
        # 1. One model answer alone vs eight at once (distinct questions that need the model).
        if needs_model:
            c = client()
            # Warm-up on another question: first-call costs (allocations, caches) are not the server's, and the same
            # question again would be drafted from its own answer (prompt lookup remembers recent answers).
            ask(c, needs_model[-1])
            one_ms, _ = ask(c, needs_model[0])
            batches_before = len(service.batcher.stats.batch_sizes)
            eight = [needs_model[(1 + i) % len(needs_model)] for i in range(8)]  # not the one just answered
            clients = [client() for _ in eight]  # made first: creating a client takes longer than the batch window
            t = time.perf_counter()
            with ThreadPoolExecutor(8) as pool:
                list(pool.map(ask, clients, eight))
            eight_ms = (time.perf_counter() - t) * 1000
            result["one_vs_eight"] = {
                "one_answer_ms": round(one_ms, 1),
                "eight_concurrent_ms": round(eight_ms, 1),
                "answers_per_s_one": round(1000 / one_ms, 2),
                "answers_per_s_eight": round(8000 / eight_ms, 2),
                "batch_sizes": service.batcher.stats.batch_sizes[batches_before:],
            }
        # 2. The load test: every client asks the held-out questions in turn until the count or the time is up.
        lines_before = service.audit.lines
        batches_before = len(service.batcher.stats.batch_sizes)
        lock, asked, done, errors = threading.Lock(), [0], [], []
        # Not the questions asked above: prompt lookup drafts from recent answers, so a question asked again would
        # be drafted from its own answer (a real repeat, but not what this figure compares across runs).
        used = set(needs_model[:9]) | {needs_model[-1]} if needs_model else set()
        fresh = [q for q in questions if q not in used] or questions
        deadline = time.perf_counter() + b.seconds

        def worker():
            c = client()
            while time.perf_counter() < deadline:
                with lock:
                    if asked[0] >= b.requests:
                        return
                    question = fresh[asked[0] % len(fresh)]
                    asked[0] += 1
                try:
                    done.append(ask(c, question))
                except Exception as exc:  # counted, not fatal: the figure is the server's error rate
                    errors.append(f"{type(exc).__name__}: {exc}")

        t = time.perf_counter()
        threads = [threading.Thread(target=worker) for _ in range(b.clients)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        wall = time.perf_counter() - t
        path = Path(service.audit.path)
        records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
        ran = {r["request_id"]: r["model_answer"] is not None for r in records}
        model_ms = [ms for ms, rid in done if ran.get(rid)]
        settled_ms = [ms for ms, rid in done if rid in ran and not ran[rid]]
        sizes = service.batcher.stats.batch_sizes[batches_before:]
        result["load"] = {
            "clients": b.clients,
            "requests": asked[0],
            "answers": len(done),
            "errors": len(errors),
            "first_errors": errors[:3],
            "seconds": round(wall, 1),
            "answers_per_s": round(len(done) / wall, 2) if wall else None,
            "settled": {
                "n": len(settled_ms),
                "p50_ms": percentile(settled_ms, 0.5),
                "p95_ms": percentile(settled_ms, 0.95),
            },
            "model": {"n": len(model_ms), "p50_ms": percentile(model_ms, 0.5), "p95_ms": percentile(model_ms, 0.95)},
            "audit_lines": service.audit.lines - lines_before,
            "batches": len(sizes),
            "mean_batch": round(statistics.mean(sizes), 2) if sizes else None,
            "max_batch_seen": max(sizes) if sizes else None,
        }
    finally:
        server.close()
        service.close()
    if b.out:
        b.out.mkdir(parents=True, exist_ok=True)
        (b.out / "serve.json").write_text(json.dumps(result, indent=2, ensure_ascii=False), encoding="utf-8")
        (b.out / "serve.md").write_text(report(result), encoding="utf-8")
    return result


def report(r: dict) -> str:
    lines = ["# mlx-lora serve: load test", ""]
    if r.get("note"):
        lines += [f"Model: {r['note']}.", ""]
    lines += [f"Run: `{r['adapter']}`; model and decision state loaded in {r['load_s']} s.", ""]
    if "one_vs_eight" in r:
        o = r["one_vs_eight"]
        lines += [
            "| model answers | wall ms | answers/s | batch sizes |",
            "|---|---|---|---|",
            f"| 1 alone | {o['one_answer_ms']} | {o['answers_per_s_one']} | 1 |",
            f"| 8 concurrent | {o['eight_concurrent_ms']} | {o['answers_per_s_eight']} | {o['batch_sizes']} |",
            "",
        ]
    load = r["load"]
    lines += [
        f"Load: {load['clients']} clients, {load['requests']} requests in {load['seconds']} s → "
        f"{load['answers_per_s']} answers/s, {load['errors']} errors, {load['audit_lines']} audit lines for "
        f"{load['answers']} answers; {load['batches']} model batches, mean size {load['mean_batch']}.",
        "",
        "| answer | n | p50 ms | p95 ms |",
        "|---|---|---|---|",
        *(
            f"| {label} | {load[key]['n']} | {load[key]['p50_ms']} | {load[key]['p95_ms']} |"
            for key, label in (("settled", "settled before the model"), ("model", "the model ran"))
        ),
        "",
    ]
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--adapter", type=Path)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=120.0)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args(argv)
    from mlx_lora.commands.options import build_config

    cfg = build_config(None, tuple(args.overrides))
    b = ServeBench(args.adapter, args.model, args.clients, args.requests, args.seconds, out=args.out)
    try:
        print(report(run_serve_bench(b, cfg)))
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
