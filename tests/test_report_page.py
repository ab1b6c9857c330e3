"""report.html in a real browser: the summary is a table, the chart's labels fit, user text stays text."""

from __future__ import annotations

from pathlib import Path

import pytest
from browser import By, screenshot

from mlx_lora.core.config import Config, DataConfig
from mlx_lora.data.formats import read_examples
from mlx_lora.data.similarity import REFUSAL
from mlx_lora.evaluation.report_text import fmt
from mlx_lora.evaluation.run import evaluate_run
from mlx_lora.evaluation.scoring import bucket, build_report, write_report


@pytest.fixture()
def splits(tmp_path, tiny_kb, tiny_questions):
    from mlx_lora.data.dataset import build_splits, write_splits
    from mlx_lora.data.kb import load_kb
    from mlx_lora.data.questions import load_questions

    kb = load_kb(tiny_kb)
    cfg = DataConfig(valid_fraction=0.2, test_fraction=0.2)
    write_splits(build_splits(kb, load_questions(tiny_questions, kb), cfg), tmp_path / "d", cfg)
    return tmp_path / "d"


def test_a_tiny_eval_runs_report_renders_its_summary_as_a_table(browser, tmp_path, tiny_kb, splits, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the report names the rules file as given: a short relative path
    test = read_examples(splits / "test.jsonl")
    cfg = Config()
    cfg.eval.embedder = "char"  # no embedding model needed
    tuned = [e.answer for e in test]
    tuned[0] = test[-1].answer  # one wrong answer, so that the worst-answers tables show something
    Path("rules.yaml").write_text("rules:\n  - id: vpn\n    doc_id: vpn\n    keywords: [VPN]\n", encoding="utf-8")
    report = evaluate_run(
        cfg,
        None,
        "unused-adapter",
        splits / "test.jsonl",
        splits / "valid.jsonl",
        splits / "train.jsonl",
        tiny_kb,
        tmp_path / "out",
        rules_path="rules.yaml",
        answers={"tuned": tuned, "base": ["我不知道。"] * len(test)},
        progress=False,
    )
    browser.get((tmp_path / "out" / "report.html").as_uri())
    assert browser.title == "mlx-lora evaluation"
    assert not browser.find_elements(By.TAG_NAME, "pre")  # no Markdown shown as text any more

    table = browser.find_element(By.CSS_SELECTOR, "table#summary")
    headers = [th.text for th in table.find_elements(By.CSS_SELECTOR, "thead th")]
    assert headers[:3] == ["variant", "rows", "mean sim"] and "verdict" in headers and "≥85" in headers
    rows = table.find_elements(By.CSS_SELECTOR, "tbody tr")
    assert [r.find_element(By.CSS_SELECTOR, "td").text for r in rows] == list(report["summary"])
    tuned_row = [td.text for td in rows[list(report["summary"]).index("tuned")].find_elements(By.TAG_NAME, "td")]
    figures = report["summary"]["tuned"]
    assert tuned_row[1:3] == [str(figures["rows"]), fmt(figures["mean_similarity"])]
    assert tuned_row[-1] == ("PASS" if figures["passed"] else "FAIL")

    for name, variant in report["variants"].items():  # each variant: sources and worst answers as tables
        section = browser.find_element(By.CSS_SELECTOR, f'section[data-variant="{name}"]')
        worst = section.find_elements(By.CSS_SELECTOR, "table[id^=worst-] tbody tr")
        assert len(worst) == len(variant["worst"])
        assert worst[0].find_elements(By.TAG_NAME, "td")[2].text == " ".join(variant["worst"][0]["question"].split())
    screenshot(browser, tmp_path / "shots" / "report.png", height=1250)  # summary, chart, a variant
    assert (tmp_path / "shots" / "report.png").stat().st_size > 10_000


def _row(sim: float, question: str, expected_doc: str = "vpn", predicted: str = "vpn") -> dict:
    return {
        "question": question,
        "expected": "依據公司規範:VPN 設定:下載新版 client,以 SSO 登入。",
        "generated": question,
        "expected_doc": expected_doc,
        "answerable": expected_doc != REFUSAL,
        "similarity": sim,
        "char": sim,
        "bucket": bucket(sim),
        "predicted_doc": predicted,
        "predicted_score": sim,
        "refused": predicted == REFUSAL,
        "source": "MODEL_GENERATED",
        "detail": {},
    }


def test_chart_labels_fit_and_user_text_is_never_markup(browser, tmp_path):
    long_name = "tuned_rules_第二版（知識庫新增文件之後重新評估）"
    attack = "<img src=x onerror=\"document.title='pwned'\"><script>document.title='pwned'</script>"
    variants = {
        "tuned": [_row(100, attack), _row(100, "VPN 怎麼設定?")],
        long_name: [_row(100, "請假"), _row(100, "今天天氣如何?", REFUSAL, REFUSAL)],
    }
    measure = {"name": "char", "description": "chrF <b>not bold</b>", "fallback": None, "char": "chrF"}
    write_report(build_report(variants, "faq", measure, meta={"notes": {"rules": attack}}), tmp_path)
    browser.get((tmp_path / "report.html").as_uri())
    assert browser.title == "mlx-lora evaluation"  # no injected script or handler ran
    assert not browser.find_elements(By.CSS_SELECTOR, "img, b, script")
    assert attack in browser.find_element(By.ID, "notes").text
    cells = browser.find_elements(By.CSS_SELECTOR, "table[id^=worst-] td")
    assert any(td.text == attack for td in cells)

    # Every label inside the drawing, variant names left of the bars, measured by the browser's own layout.
    boxes = browser.execute_script(
        """const svg = document.querySelector('svg#chart');
        const axis = Number(svg.querySelector('line').getAttribute('x1'));
        return {width: svg.viewBox.baseVal.width, axis: axis, labels: [...svg.querySelectorAll('text')].map(
            t => { const b = t.getBBox(); return {text: t.textContent, cls: t.getAttribute('class'),
                                                 left: b.x, right: b.x + b.width}; })};"""
    )
    assert {b["text"] for b in boxes["labels"]} >= {long_name, "mean sim 100", "refusal acc 100"}
    for label in boxes["labels"]:
        assert 0 <= label["left"] and label["right"] <= boxes["width"], label
        if label["cls"] == "name":
            assert label["right"] < boxes["axis"], label


def test_the_page_without_a_browser_escapes_text_and_survives_empty_figures():
    from mlx_lora.evaluation.report_html import html_page, text_width

    attack = "<script>x</script>"
    variants = {attack: [_row(100, attack)], "base": [_row(10, "q", REFUSAL, "vpn")]}
    measure = {"name": "char", "description": "chrF", "fallback": None, "char": "chrF"}
    page = html_page(build_report(variants, "faq", measure))
    assert "<script>" not in page and page.count("&lt;script&gt;x&lt;/script&gt;") >= 4  # table, chart, nav, rows
    assert "<pre>" not in page and '<table id="summary">' in page
    assert html_page(build_report({}, "faq", measure)).count("<table") == 0  # no variants: no tables, no chart
    assert text_width("知識庫", 10) == 30 and text_width("abc", 10) < 30
