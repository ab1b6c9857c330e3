"""Benchmark rows → medians, paired ratios, results.json, report.md (Markdown tables) and chart.png."""

from __future__ import annotations

import json
import os
from pathlib import Path

from benchmarks.measure import quantiles, spread
from mlx_lora.core.files import atomic_write_text, write_json

NAMES = {
    "ours": "{engine} (ours)",
    "ours-bf16": "{engine} bf16 (ours)",
    "hf-trainer": "HF Trainer, seed-style ({engine})",
    "hf-trainer-tuned": "HF Trainer, well-configured ({engine})",
    "hf-trainer-tuned-bf16": "HF Trainer, well-configured, bf16 ({engine})",
    "mlx-lm": "mlx-lm lora ({engine})",
    "hf-generate": "HF generate ({engine})",
    "hf-generate-bf16": "HF generate, bf16 ({engine})",
}


def label(row: dict) -> str:
    return NAMES.get(row["impl"], "{engine} " + row["impl"]).format(engine=row["engine"])


def _ok(rows: list[dict], suite: str) -> list[dict]:
    return [r for r in rows if r["suite"] == suite and not r.get("error")]


def _groups(rows: list[dict]) -> dict[tuple, list[dict]]:
    out: dict[tuple, list[dict]] = {}
    for r in rows:
        out.setdefault((r["engine"], r["impl"]), []).append(r)
    return out


def peak_flops(rows: list[dict], engine: str, threads: int) -> float | None:
    """The fp32 matmul peak a training engine is compared with: same framework and device, same BLAS, and for
    torch on CPU the same thread count."""
    best = [
        r["flops_per_s"]
        for r in _ok(rows, "roofline")
        if r["engine"] == engine and r["dtype"] == "float32" and r.get("threads") in (None, threads)
    ]
    return max(best) if best else None


def summarize_training(rows: list[dict]) -> list[dict]:
    out = []
    for (engine, impl), reps in _groups(_ok(rows, "training")).items():
        steps = [s for r in reps for s in r.get("step_s", [])]
        first = reps[0]
        item = {
            "name": label(first),
            "engine": engine,
            "impl": impl,
            "backend": first["backend"],
            "reps": len(reps),
            "steps_per_rep": first.get("steps_measured"),
            "tokens_per_s": spread([r.get("tokens_per_s") for r in reps]),
            "supervised_tokens_per_s": spread([r.get("supervised_tokens_per_s") for r in reps]),
            "step_s": quantiles(steps),
            "peak_mem_mb": spread([r.get("peak_mem_mb") for r in reps]),
            "peak_mem_kind": first.get("peak_mem_kind"),
            "peak_rss_mb": spread([r.get("peak_rss_mb") for r in reps]),
            "train_flops_per_s": spread([r.get("train_flops_per_s") for r in reps]),
            "trainable_params": first.get("trainable_params"),
            "precision": first.get("precision"),
            "valid_answer_loss": spread([r.get("valid_answer_loss") for r in reps]),
        }
        # Each task measured the fp32 matmul peak in its own process right after its steps (same load);
        # rows without it fall back to the roofline suite's figure.
        item["fraction_of_peak"] = spread([r.get("fraction_of_peak") for r in reps])
        item["matmul_peak_flops_per_s"] = spread([(r.get("peak_matmul") or {}).get("flops_per_s") for r in reps])
        peak = peak_flops(rows, engine, first["threads"])
        achieved = item["train_flops_per_s"]["median"]
        if item["fraction_of_peak"]["median"] is None and achieved and peak:
            item["fraction_of_peak"] = spread([achieved / peak])
            item["matmul_peak_flops_per_s"] = spread([peak])
        out.append(item)
    return out


def summarize_generation(rows: list[dict]) -> list[dict]:
    out = []
    for (engine, impl), reps in _groups(_ok(rows, "generation")).items():
        first = reps[0]
        out.append(
            {
                "name": label(first),
                "engine": engine,
                "impl": impl,
                "reps": len(reps),
                "batch": first["batch"],
                "prompt_tokens": first["prompt_tokens"],
                "new_tokens": first["new_tokens"],
                "prefill_tokens_per_s": spread([r["prefill_tokens_per_s"] for r in reps]),
                "decode_tokens_per_s": spread([r["decode_tokens_per_s"] for r in reps]),
                "answer_tokens_per_s": spread([r.get("answer_tokens_per_s") for r in reps]),
                "answer_tokens": first.get("answer_tokens"),
                "peak_mem_mb": spread([r.get("peak_mem_mb") for r in reps]),
                "outputs_sha": first["outputs_sha"],
                "answers_sha": first.get("answers_sha"),
            }
        )
    return out


def summarize_roofline(rows: list[dict]) -> list[dict]:
    return [
        {
            "engine": r["engine"],
            "framework": r["framework"],
            "n": r["n"],
            "dtype": r["dtype"],
            "threads": r["threads"],
            "seconds_median": r["seconds_median"],
            "flops_per_s": r["flops_per_s"],
        }
        for r in _ok(rows, "roofline")
    ]


def paired_ratio(rows: list[dict], suite: str, a: tuple[str, str], b: tuple[str, str], key: str) -> dict | None:
    """Median over repetitions of value(a, rep) / value(b, rep): each rep's pair ran next to each other."""
    by = {(r["engine"], r["impl"], r.get("rep")): r.get(key) for r in _ok(rows, suite)}
    ratios = [
        by[(*a, rep)] / by[(*b, rep)]
        for (e, i, rep) in list(by)
        if (e, i) == a and by.get((*a, rep)) and by.get((*b, rep))
    ]
    if not ratios:
        return None
    return {"a": a, "b": b, "metric": key, **spread(ratios)}


def ratios(rows: list[dict]) -> list[dict]:
    engines = {r["engine"]: r["backend"] for r in rows if r["suite"] == "training"}
    found = []

    def add(title, suite, a, b, key):
        ratio = paired_ratio(rows, suite, a, b, key)
        if ratio:
            found.append({"title": title, **ratio})

    for engine, backend in engines.items():
        if backend == "torch":
            pairs = [
                ("ours", "hf-trainer"),
                ("ours", "hf-trainer-tuned"),
                ("ours-bf16", "hf-trainer"),
                ("ours-bf16", "hf-trainer-tuned"),
                ("ours-bf16", "hf-trainer-tuned-bf16"),
                ("ours-bf16", "ours"),
            ]
        else:
            pairs = [("ours", "mlx-lm")]
        for a, b in pairs:
            for key in ("supervised_tokens_per_s", "tokens_per_s"):
                add(f"{engine}: {a} vs {b} ({key})", "training", (engine, a), (engine, b), key)
    if "mlx-cpu+openblas" in engines and "mlx-cpu" in engines:
        for impl in ("ours", "mlx-lm"):
            add(
                f"OpenBLAS preload vs reference BLAS ({impl}, tokens_per_s)",
                "training",
                ("mlx-cpu+openblas", impl),
                ("mlx-cpu", impl),
                "tokens_per_s",
            )
    for mlx in ("mlx-cpu+openblas", "mlx-cpu", "mlx-metal", "mlx-cuda"):
        if mlx in engines and "torch-cpu" in engines:
            add(
                f"torch-cpu vs {mlx} (ours, tokens_per_s)",
                "training",
                ("torch-cpu", "ours"),
                (mlx, "ours"),
                "tokens_per_s",
            )
    for engine in {r["engine"] for r in rows if r["suite"] == "generation" and r["impl"] == "hf-generate"}:
        for suffix, name in (("", ""), ("-bf16", ", bf16")):
            for key in ("prefill_tokens_per_s", "decode_tokens_per_s", "answer_tokens_per_s"):
                ours, hf = (engine, "ours" + suffix), (engine, "hf-generate" + suffix)
                add(f"{engine}: ours vs HF generate{name} ({key})", "generation", ours, hf, key)
        for key in ("prefill_tokens_per_s", "decode_tokens_per_s"):  # what generate.precision=auto gains here
            add(f"{engine}: ours bf16 vs ours fp32 ({key})", "generation", (engine, "ours-bf16"), (engine, "ours"), key)
    return found


def _num(v, digits=0) -> str:
    if v is None:
        return "–"
    if abs(v) >= 1e9:
        return f"{v / 1e9:.1f} G"
    if abs(v) >= 1e6:
        return f"{v / 1e6:.1f} M"
    return f"{v:,.{digits}f}"


def _pairs(d: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in d.items())


def _load(values) -> str:
    return "/".join(f"{v:.1f}" for v in values) if values else "unknown"


def _med(s: dict, digits=0) -> str:
    if not s or s.get("median") is None:
        return "–"
    text = _num(s["median"], digits)
    if s.get("n", 0) > 1 and s.get("rel_spread") is not None:
        text += f" ±{100 * s['rel_spread']:.0f}%"
    return text


def markdown(
    meta: dict, training: list[dict], gen: list[dict], roof: list[dict], found: list[dict], errors: list[dict]
) -> str:
    hw, s = meta["hardware"], meta["settings"]
    versions = ", ".join(f"{k} {v}" for k, v in meta["versions"].items())
    lines = [
        f"# Benchmark: {meta['model']['label']} model, {meta['date']}, {hw['platform']}",
        "",
        f"- Machine: {hw['cpu']}, {hw['cores']} cores, {hw['memory_gib'] or 0:.0f} GiB, SIMD: "
        f"{' '.join(hw['cpu_flags']) or 'unknown'}; load average (1/5/15 min) at start "
        f"{_load(hw['load_average_at_start'])}, at end {_load(meta['load_average_at_end'])}",
        f"- Threads: {meta['threads']} (torch.set_num_threads, OMP/OPENBLAS/MKL_NUM_THREADS)",
        f"- Versions: {versions}",
        f"- Model: {meta['model']['label']} (`{meta['model']['path']}`): {_pairs(meta['model']['shape'])}",
        f"- Data: {_pairs(meta['data'])}",
        f"- Settings: reps {s['reps']}, warm-up steps {s['warmup']} (dropped), measured steps {s['steps']}, "
        f"quick {s['quick']}, one process per task {s['isolate']}; generation batch {s['gen_batch']}, "
        f"{s['gen_tokens']} new tokens",
        f"- Command: `{meta['command']}`; source: {meta.get('source') or 'unknown'}",
        "",
        "Medians over repetitions; ±x% = half the min–max range of the repetitions' values. Repetitions ran "
        "interleaved (A B A B …) on a shared, noisy machine: compare ratios, not absolute numbers.",
    ]
    if training:  # `--no-training` runs generation alone
        lines += [
            "",
            "## Training",
            "",
            "| engine | tokens/s | supervised tokens/s | step s, median [p25–p75] | peak memory MB | peak RSS MB | "
            "achieved FLOP/s | of the matmul FLOP/s (its precision) measured after it | answer-only valid loss |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
    for t in training:
        q = t["step_s"]
        step = f"{q['median']:.3f} [{q['p25']:.3f}–{q['p75']:.3f}]" if q["median"] is not None else "–"
        f = t["fraction_of_peak"]
        peak = _num(t["matmul_peak_flops_per_s"]["median"])
        frac = "–" if f["median"] is None else f"{100 * f['median']:.0f}% of {peak}"
        if f.get("n", 0) > 1:
            frac += f" ({100 * f['min']:.0f}–{100 * f['max']:.0f}%)"
        lines.append(
            f"| {t['name']} | {_med(t['tokens_per_s'])} | {_med(t['supervised_tokens_per_s'])} | {step} | "
            f"{_med(t['peak_mem_mb'])} ({t['peak_mem_kind']}) | {_med(t['peak_rss_mb'])} | "
            f"{_med(t['train_flops_per_s'])} | {frac} | {_med(t['valid_answer_loss'], 4)} |"
        )
    lines += ["", "## Ratios (paired by repetition, median)", "", "| comparison | ratio | range |", "|---|---|---|"]
    for r in found:
        lines.append(f"| {r['title']} | {r['median']:.2f}× | {r['min']:.2f}–{r['max']:.2f} (n={r['n']}) |")
    if gen:
        lines += [
            "",
            "## Generation",
            "",
            f"Method: {meta['generation_method']}.",
            "",
            "| engine | batch | prompt tokens | new tokens | prefill tokens/s | decode tokens/s | answer tokens | "
            "answers: tokens/s | peak memory MB | outputs | answers |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for g in gen:
            lines.append(
                f"| {g['name']} | {g['batch']} | {g['prompt_tokens']} | {g['new_tokens']} | "
                f"{_med(g['prefill_tokens_per_s'])} | {_med(g['decode_tokens_per_s'], 1)} | "
                f"{_num(g.get('answer_tokens'))} | {_med(g.get('answer_tokens_per_s', {}), 1)} | "
                f"{_med(g['peak_mem_mb'])} | `{g['outputs_sha']}` | `{g.get('answers_sha')}` |"
            )
    if roof:
        lines += [
            "",
            "## Roofline: measured matmul",
            "",
            "| framework (engine) | n | dtype | threads | s | FLOP/s |",
            "|---|---|---|---|---|---|",
        ]
        for r in roof:
            lines.append(
                f"| {r['framework']} ({r['engine']}) | {r['n']}³ | {r['dtype']} | {r['threads'] or '–'} | "
                f"{r['seconds_median']:.4f} | {_num(r['flops_per_s'])} |"
            )
        lines += [
            "",
            f"Training FLOPs per step = {meta['flops_formula']}; N counted from config.json; "
            "achieved FLOP/s = that work / measured step time. Each training task then timed an fp32 "
            "2048³ product (smaller where that would exceed 1.5 s) in the same process, framework, BLAS "
            "and thread count: the training table's percentage is achieved / that figure, per repetition "
            "(median, range). The table above is the separate roofline suite (1 thread and all threads, "
            "fp32 and bf16).",
        ]
    if errors:
        lines += ["", "## Failed tasks", ""] + [
            f"- {e['suite']} {label(e)} rep {e.get('rep')}: {e['error']}" for e in errors
        ]
    return "\n".join(lines) + "\n"


def chart(path: Path, training: list[dict], gen: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and CI
    import matplotlib.pyplot as plt

    panels = [
        ("training: supervised tokens/s", training, "supervised_tokens_per_s"),
        ("generation: prefill tokens/s", gen, "prefill_tokens_per_s"),
        ("generation: decode tokens/s", gen, "decode_tokens_per_s"),
        ("generation: answers (to the stop token), tokens/s", gen, "answer_tokens_per_s"),
    ]
    panels = [p for p in panels if p[1]]
    fig, axes = plt.subplots(len(panels), 1, figsize=(9, 2.2 + 1.6 * len(panels) + 0.25 * len(training)), squeeze=False)
    for ax, (title, items, key) in zip(axes[:, 0], panels):
        items = [i for i in items if (i.get(key) or {}).get("median")]
        names = [i["name"] for i in items]
        med = [i[key]["median"] for i in items]
        err = [[m - i[key]["min"] for m, i in zip(med, items)], [i[key]["max"] - m for m, i in zip(med, items)]]
        ax.barh(names, med, xerr=err, color=["#4c72b0" if i["impl"] == "ours" else "#dd8452" for i in items])
        if med and max(med) / max(min(med), 1e-9) > 30:
            ax.set_xscale("log")
        ax.invert_yaxis()
        ax.set_title(title + " (median, bars: min–max of repetitions; blue = ours)", fontsize=9)
        ax.tick_params(labelsize=8)
        ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)


def write(out: Path, rows: list[dict], meta: dict) -> dict:
    training, gen = summarize_training(rows), summarize_generation(rows)
    roof, found = summarize_roofline(rows), ratios(rows)
    errors = [r for r in rows if r.get("error")]
    results = {
        "meta": meta,
        "training": training,
        "generation": gen,
        "roofline": roof,
        "ratios": found,
        "errors": [{k: r.get(k) for k in ("suite", "engine", "impl", "rep", "error")} for r in errors],
        "rows": rows,
    }
    write_json(out / "results.json", results)
    atomic_write_text(out / "report.md", markdown(meta, training, gen, roof, found, errors))
    if training or gen:
        chart(out / "chart.png", training, gen)
    return results


def load(out: Path) -> dict:
    return json.loads((out / "results.json").read_text(encoding="utf-8"))
