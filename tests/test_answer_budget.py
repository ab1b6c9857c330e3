"""generate.max_new_tokens: null follows the run's longest answer, in generate/eval/serve and the export."""

from __future__ import annotations

import json

import pytest

from mlx_lora.backends.loading import FALLBACK_NEW_TOKENS, MIN_NEW_TOKENS, answer_budget, resolve_answer_budget
from mlx_lora.core.config import Config


def _run(longest: int | None) -> dict:
    return {"data": {"longest_answer_tokens": longest} if longest is not None else {}}


def test_answer_budget_is_half_again_the_longest_answer_unless_set():
    assert answer_budget(None, _run(72)) == 108
    assert answer_budget(None, _run(301)) == 451
    assert answer_budget(None, _run(5)) == MIN_NEW_TOKENS  # a tiny run still gets room for a sentence
    assert answer_budget(None, _run(None)) == FALLBACK_NEW_TOKENS  # a run from before the record
    assert answer_budget(None, None) == FALLBACK_NEW_TOKENS  # a base model or a bare adapter folder
    assert answer_budget(40, _run(72)) == 40  # a set cap is the user's


def test_a_cap_shorter_than_the_trained_answers_warns_and_is_kept(capsys):
    cfg = Config()
    cfg.generate.max_new_tokens = 50
    resolve_answer_budget(cfg, _run(72), "runs/x")
    err = capsys.readouterr().err
    assert cfg.generate.max_new_tokens == 50
    assert err.count("\n") == 1 and "generate.max_new_tokens 50" in err and "(72 tokens)" in err and "null" in err
    cfg.generate.max_new_tokens = None
    resolve_answer_budget(cfg, _run(72), "runs/x")
    assert cfg.generate.max_new_tokens == 108 and capsys.readouterr().err == ""


def test_the_run_records_its_longest_answer_and_generation_follows_it(tiny_run, capsys):
    pytest.importorskip("torch")
    from mlx_lora.backends.loading import load_for_generation
    from mlx_lora.data.formats import encode_all, read_examples
    from mlx_lora.data.render import ChatTokenizer

    run = tiny_run / "run"
    manifest = json.loads((run / "manifest.json").read_text(encoding="utf-8"))
    longest = manifest["data"]["longest_answer_tokens"]
    tok = ChatTokenizer.from_dir(manifest["base_model"]["path"])
    rows = []
    for split in ("train", "valid"):
        rows += encode_all(tok, read_examples(tiny_run / "data" / f"{split}.jsonl"), Config().train.max_length)[0]
    assert longest == max(r.supervised for r in rows) > 0

    cfg = Config()
    cfg.generate.max_new_tokens = None
    load_for_generation(None, run, cfg, progress=False)
    assert cfg.generate.max_new_tokens == max(MIN_NEW_TOKENS, longest + longest // 2)

    cfg = Config()
    cfg.generate.max_new_tokens = 1
    load_for_generation(None, run, cfg, progress=False)
    assert cfg.generate.max_new_tokens == 1 and "will be cut" in capsys.readouterr().err


def test_serve_has_the_budget_before_requests_read_it(tiny_run):
    pytest.importorskip("fastapi")
    from serve_helpers import serve_cfg

    from mlx_lora.serve.service import ServeSettings, Service

    run = tiny_run / "run"
    longest = json.loads((run / "manifest.json").read_text(encoding="utf-8"))["data"]["longest_answer_tokens"]
    cfg = serve_cfg(tiny_run, "torch")
    cfg.generate.max_new_tokens = None
    service = Service(
        cfg, str(run), None, None, ServeSettings(audit_path=str(tiny_run / "audit-budget.jsonl")), progress=False
    )
    service.start()  # returns once the model has loaded (load_for_generation fixed the budget)
    try:
        assert cfg.generate.max_new_tokens == max(MIN_NEW_TOKENS, longest + longest // 2)
    finally:
        service.close()
