"""`mlx-lora bench`: a quick run on the tiny model produces valid rows, and the pieces behind them add up.

Only structure and positivity are asserted, never speed (the machines are shared and noisy).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

sys.path.insert(0, str(REPO))  # benchmarks/ is a source-checkout package, not installed

from benchmarks import report, roofline, run, tiny


def test_tiny_tokenizer_subset_tokenizes_identically_with_a_small_vocabulary():
    from tokenizers import Tokenizer

    texts = [
        "<|im_start|>user\nVPN 連不上怎麼辦?<|im_end|>\n",
        "<|im_start|>assistant\n依據公司規範:請以 SSO 登入。<|im_end|>",
    ]
    path = tiny.tokenizer_files() / "tokenizer.json"
    big = Tokenizer.from_file(str(path))
    used = {t for text in texts for t in big.encode(text, add_special_tokens=False).tokens}
    small_json = tiny.subset_tokenizer(json.loads(path.read_text(encoding="utf-8")), used)
    small = Tokenizer.from_str(json.dumps(small_json))
    for text in texts:
        assert small.encode(text, add_special_tokens=False).tokens == big.encode(text, add_special_tokens=False).tokens
    assert small.get_vocab_size() < 2000 < big.get_vocab_size()
    assert sorted(small.get_vocab().values()) == list(range(small.get_vocab_size()))  # dense ids
    unseen = "週末加班 overtime 規則"  # not in the texts: falls back to smaller pieces, still round-trips
    assert small.decode(small.encode(unseen).ids) == unseen


def test_training_flops_formula_by_hand():
    config = {
        "hidden_size": 8,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "intermediate_size": 16,
        "num_hidden_layers": 2,
        "vocab_size": 10,
    }
    shape = roofline.model_shape(config)
    # per layer: q 8·8 + k 8·4 + v 8·4 + o 8·8 + gate/up/down 3·8·16 = 576
    assert shape["n_frozen"] == 2 * 576 and shape["n_head"] == 80
    lora = {"rank": 2, "targets": ["q_proj", "v_proj"], "num_layers": None}
    assert roofline.lora_params(shape, 2, ["q_proj", "v_proj"], None) == 2 * (2 * 16 + 2 * 12)
    assert (
        roofline.training_flops(shape, lora, computed_tokens=10, head_positions=3)
        == 4 * 1152 * 10 + 6 * 112 * 10 + 4 * 80 * 3
    )


def test_ratios_pair_repetitions():
    rows = [
        {
            "suite": "training",
            "engine": "torch-cpu",
            "backend": "torch",
            "impl": impl,
            "rep": rep,
            "tokens_per_s": value,
            "supervised_tokens_per_s": value / 2,
        }
        for impl, values in (("ours", (10.0, 30.0, 40.0)), ("hf-trainer", (5.0, 10.0, 10.0)))
        for rep, value in enumerate(values)
    ]
    found = {r["title"]: r for r in report.ratios(rows)}
    ratio = found["torch-cpu: ours vs hf-trainer (tokens_per_s)"]
    assert ratio["median"] == 3.0 and (ratio["min"], ratio["max"], ratio["n"]) == (2.0, 4.0, 3)


def test_the_well_configured_collator_pads_to_the_batch_and_learns_only_answers():
    pytest.importorskip("torch")
    from benchmarks.baselines import tuned_collator

    log: list[dict] = []
    rows = [{"input_ids": [5, 6, 7, 8], "mask": [0, 0, 1, 1]}, {"input_ids": [5, 9], "mask": [0, 1]}]
    batch = tuned_collator(0, log)(rows)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8], [5, 9, 0, 0]]  # the longest row, not a fixed 192
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, -100, 7, 8], [-100, 9, -100, -100]]  # the answer tokens only
    assert log == [{"tokens": 6, "computed": 8, "head": 8, "supervised": 3}]


def test_bf16_is_measured_only_where_the_machine_has_bf16_units():
    cpu, cuda = run.Engine("torch-cpu", "torch", "cpu"), run.Engine("torch-cuda", "torch", "cuda")
    assert run.bf16_units(cpu, ["avx2", "avx512_bf16"]) and run.bf16_units(cpu, ["amx_bf16"])
    assert not run.bf16_units(cpu, ["avx2", "fma"])  # AVX2-only: emulated bf16, never measured as an option
    assert run.bf16_units(cuda, [])
    s = run.Settings(quick=True, cpu_flags=["avx2"]).resolved()
    impls = {t["impl"] for t in run.plan([cpu], s) if t["suite"] == "training"}
    assert impls == {"ours", "hf-trainer", "hf-trainer-tuned"}
    s = run.Settings(quick=True, cpu_flags=["avx512_bf16"]).resolved()
    impls = {t["impl"] for t in run.plan([cpu], s) if t["suite"] == "training"}
    assert impls == {"ours", "ours-bf16", "hf-trainer", "hf-trainer-tuned", "hf-trainer-tuned-bf16"}


def test_no_training_plans_generation_only():
    cpu = run.Engine("torch-cpu", "torch", "cpu")
    s = run.Settings(quick=True, training=False, roofline=False).resolved()
    suites = [t["suite"] for t in run.plan([cpu], s)]
    assert suites and set(suites) == {"generation"}
    assert {t["impl"] for t in run.plan([cpu], s)} == {"ours", "hf-generate"}
    s = run.Settings(quick=True, training=False, roofline=False, cpu_flags=["avx512_bf16"]).resolved()
    tasks = run.plan([cpu], s)  # each precision against HF generate in the same one
    assert {(t["impl"], t["precision"]) for t in tasks} == {
        ("ours", "fp32"),
        ("hf-generate", "fp32"),
        ("ours-bf16", "bf16"),
        ("hf-generate-bf16", "bf16"),
    }
    s = run.Settings(quick=True, training=False, roofline=False, adapter=Path("runs/x")).resolved()
    assert {t["adapter"] for t in run.plan([cpu], s)} == {"runs/x"}  # both ours and HF generate load it


def test_unknown_or_missing_backend_is_a_user_error():
    from mlx_lora.core.errors import UserError

    engines = {"torch-cpu": run.Engine("torch-cpu", "torch", "cpu")}
    with pytest.raises(UserError, match="unknown tpu"):
        run.choose(engines, ["tpu"])
    with pytest.raises(UserError, match="mlx-metal not available"):
        run.choose(engines, ["mlx-metal"])


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """One `bench --quick` on the tiny model: torch-cpu and mlx-cpu with their baselines, 1 rep, 2 steps."""
    pytest.importorskip("torch")
    pytest.importorskip("mlx.core")
    out = tmp_path_factory.mktemp("bench")
    env = {**__import__("os").environ, "MLX_LORA_CACHE": str(tmp_path_factory.mktemp("cache"))}
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            "from mlx_lora.cli import main; main()",
            "bench",
            "--quick",
            "--backends",
            "torch-cpu,mlx-cpu",
            "--reps",
            "1",
            "--steps",
            "2",
            "--warmup",
            "0",
            "--threads",
            "1",
            "--gen-batch",
            "2",
            "--gen-tokens",
            "3",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return out, done


def test_quick_bench_writes_every_output(quick):
    out, done = quick
    assert (out / "chart.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = (out / "report.md").read_text(encoding="utf-8")
    assert "## Training" in text and "## Generation" in text and "## Roofline" in text
    assert "HF Trainer, seed-style (torch-cpu)" in text and "mlx-lm lora (mlx-cpu)" in text
    assert text in done.stdout  # the command prints the table
    results = json.loads((out / "results.json").read_text(encoding="utf-8"))
    assert results["errors"] == []
    assert results["meta"]["threads"] == 1 and results["meta"]["versions"]["torch"]
    titles = {r["title"] for r in results["ratios"]}
    assert "torch-cpu: ours vs hf-trainer (supervised_tokens_per_s)" in titles
    assert "torch-cpu: ours vs hf-trainer-tuned (supervised_tokens_per_s)" in titles
    assert "HF Trainer, well-configured (torch-cpu)" in text
    assert "mlx-cpu: ours vs mlx-lm (supervised_tokens_per_s)" in titles


def test_quick_bench_rows_are_valid(quick):
    out, _ = quick
    rows = [json.loads(line) for line in (out / "rows.jsonl").read_text(encoding="utf-8").splitlines()]
    assert all(not r.get("error") for r in rows), [r["error"] for r in rows if r.get("error")]
    kinds = {(r["suite"], r["engine"], r["impl"]) for r in rows}
    assert kinds >= {
        ("training", "torch-cpu", "ours"),
        ("training", "torch-cpu", "hf-trainer"),
        ("training", "torch-cpu", "hf-trainer-tuned"),
        ("training", "mlx-cpu", "ours"),
        ("training", "mlx-cpu", "mlx-lm"),
        ("generation", "torch-cpu", "ours"),
        ("generation", "torch-cpu", "hf-generate"),
        ("generation", "mlx-cpu", "ours"),
        ("roofline", "torch-cpu", "matmul"),
        ("roofline", "mlx-cpu", "matmul"),
    }
    for r in rows:
        if r["suite"] == "training":
            assert r["steps_measured"] == 2 and len(r["step_s"]) == 2 and min(r["step_s"]) > 0
            assert r["tokens_per_s"] > 0 and 0 < r["supervised_tokens"] <= r["tokens"] <= r["computed_tokens"]
            assert r["train_flops_per_s"] > 0 and r["peak_mem_mb"] > 0 and r["peak_rss_mb"] > 0
            assert r["trainable_params"] > 0 and r["peak_matmul"]["flops_per_s"] > 0 and r["fraction_of_peak"] > 0
            if r["impl"] == "ours":
                assert r["replay_matches_events"]  # our FLOP accounting saw the batches the loop trained on
            if r["backend"] == "torch":  # every torch implementation is held to the same answer-only valid loss
                assert r["valid_answer_loss"] > 0 and r["peak_matmul"]["dtype"] in ("float32", "bfloat16")
        elif r["suite"] == "generation":
            assert r["generated_tokens"] == r["batch"] * r["new_tokens"] == 2 * 3
            assert r["prefill_tokens_per_s"] > 0 and r["decode_tokens_per_s"] > 0
            assert 0 <= r["answer_tokens"] <= r["generated_tokens"] and r["answer_s"] > 0
        else:
            assert r["flops_per_s"] > 0 and r["seconds_median"] > 0
    assert {r["precision"] for r in rows if r["suite"] == "generation" and r["engine"] == "mlx-cpu"} == {None}
    for precision in {r["precision"] for r in rows if r["suite"] == "generation" and r["engine"] == "torch-cpu"}:
        same = {
            r["outputs_sha"]
            for r in rows
            if r["suite"] == "generation" and r["engine"] == "torch-cpu" and r["precision"] == precision
        }
        assert len(same) == 1  # greedy: our batched generate and HF generate pick the same tokens
        answers = {
            r["answers_sha"]
            for r in rows
            if r["suite"] == "generation" and r["engine"] == "torch-cpu" and r["precision"] == precision
        }
        assert len(answers) == 1  # and stop at the same stop token
