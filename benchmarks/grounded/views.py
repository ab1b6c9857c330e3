"""Does the tuned model decide better when it reads its passages another way? Per valid row of a run, the first
answer token (cite or refuse) and the cited passage's number, read from the prompt as shown and from other views of
the same passages — the orders that put each passage first (`--views orders`) or each passage alone (`singles`) —
and the decisions pooled over the views, with the refusal bias picked on the same rows as training picks it.
`--views gold_out` asks whether the decision comes from the passages: each answerable row whose gold passage is
shown is read again without it — the other passages moved up and the next one the retriever finds last, as a
training row's hard negative shows them (`gold_swap`: the next one found in the gold passage's place) — and the
refusals of those views are counted at the bias picked as shown. `--views first_out` reads every row again
without its passage [1] (answerable or not, the next one found last) and ranks the rows by how far the refusal
margin rises: where [1] answers, taking it away should make the model much surer to refuse.

    python benchmarks/grounded/views.py RUN [--data DIR] [--kb KB] [--views orders|singles|gold_out|gold_swap|first_out]
        [--out F]

RUN is a grounded run (`runs/latest`); DIR holds its split (default RUN/data; only valid.jsonl is read, never
test). No generation: one forward pass per view and row, the prompt followed by "[" so that the same pass gives the
citation's number. Torch backend, the run's generation precision.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from pathlib import Path

import torch

from mlx_lora.backends.loading import load_for_generation
from mlx_lora.backends.torch.cache import left_padded
from mlx_lora.backends.torch.precision import for_generation
from mlx_lora.core.config import Config
from mlx_lora.core.model_store import default_cache_dir
from mlx_lora.data.fitting import fit_prompts, prompt_length
from mlx_lora.data.formats import read_examples
from mlx_lora.data.grounded import last_user, user_turn
from mlx_lora.data.kb import load_kb
from mlx_lora.data.retrieval import PassageIndex
from mlx_lora.data.similarity import make_scorer
from mlx_lora.training.refusal_bias import pick, refusal_token, refused

REPO = Path(__file__).resolve().parents[2]
BATCH = 16
GOLD_VIEWS = ("gold_out", "gold_swap")  # one view without the gold passage, read beside the prompt as shown
WIDER_VIEWS = (*GOLD_VIEWS, "first_out")  # views that need the retriever's next passage


def views(shown: list[str], kind: str, gold: str | None = None, wider: list[str] = ()) -> list[list[str]]:
    """The passages as shown first, then the other views of them."""
    if kind in GOLD_VIEWS:
        if gold not in shown:
            return [list(shown)]
        spare = [d for d in wider if d not in shown][:1]
        if kind == "gold_out":  # as a hard negative shows it: the others move up, the next one found comes last
            return [list(shown), [d for d in shown if d != gold] + spare]
        return [
            list(shown),
            [spare[0] if d == gold else d for d in shown] if spare else [d for d in shown if d != gold],
        ]
    if kind == "first_out":  # every row, answerable or not: passage [1] dropped as gold_out drops the gold one
        return views(shown, "gold_out", shown[0] if shown else None, wider)
    if kind == "singles":
        return [list(shown)] + [[doc_id] for doc_id in shown]
    return [shown[s:] + shown[:s] for s in range(len(shown))]


@torch.no_grad()
def read(loaded, prompts: list[list[int]], refusal: int, bracket: int, digits: list[int]):
    """Per prompt: (refusal margin as refusal_bias measures it, log-probabilities of the numbers 1..len(digits)
    after "[")."""
    model = loaded.model
    model.eval()
    out: list = [None] * len(prompts)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    for start in range(0, len(order), BATCH):
        rows = order[start : start + BATCH]
        ids, attention = left_padded([prompts[i] + [bracket] for i in rows], loaded.pad_id, loaded.device)
        logits = model(
            input_ids=ids,
            attention_mask=attention,
            position_ids=(attention.cumsum(-1) - 1).clamp(min=0),
            logits_to_keep=2,
        ).logits.float()
        first = logits[:, -2, :]
        own = first[:, refusal].clone()
        first[:, refusal] = float("-inf")
        margins = (own - first.max(dim=-1).values).tolist()
        numbers = torch.log_softmax(logits[:, -1, :], dim=-1)[:, digits].tolist()
        for i, margin, logp in zip(rows, margins, numbers):
            out[i] = (margin, logp)
    return out


def score(run: Path, data_dir: Path, kb_path: Path, kind: str) -> list[dict]:
    cfg = Config()
    cfg.backend.name = "torch"
    _, loaded, tok, system = load_for_generation(None, run, cfg, progress=False)
    for_generation(loaded, cfg.generate.precision, default_cache_dir())
    kb_texts = {doc_id: doc.text for doc_id, doc in load_kb(kb_path).items()}
    _, refusal = refusal_token(tok, read_examples(data_dir / "train.jsonl"))
    bracket, digits = tok.encode("[")[0], [tok.encode(str(n))[0] for n in range(1, 10)]
    length = prompt_length(tok)
    rows = fit_prompts(read_examples(data_dir / "valid.jsonl"), kb_texts, cfg.data, length)
    wider = [[]] * len(rows)
    if kind in WIDER_VIEWS:  # the index as inference builds it: the KB and the train questions
        train = read_examples(data_dir / "train.jsonl")
        asked = [(e.question, e.meta["doc_id"]) for e in train if e.meta.get("doc_id")]
        index = PassageIndex(make_scorer(cfg.eval.embedder), kb_texts, asked)
        wider = [[d for d, _ in found] for found in index.search([e.question for e in rows], cfg.data.passages + 3)]
    jobs = []
    for r, example in enumerate(rows):
        for shown in views(list(example.meta["passages"]), kind, example.meta.get("doc_id"), wider[r]):
            messages = [dict(m) for m in example.messages]
            last_user(messages)["content"] = user_turn(example.question, [(d, kb_texts[d]) for d in shown], cfg.data)
            # Each view fitted to the run's budget as a served prompt is (a KB of long texts shows fewer passages).
            view = dataclasses.replace(example, messages=messages, meta={**example.meta, "passages": shown})
            view = fit_prompts([view], kb_texts, cfg.data, length)[0]
            jobs.append((r, view.meta["passages"], tok.prompt_ids(view.prompt_messages(), system)))
    got = read(loaded, [p for _, _, p in jobs], refusal, bracket, digits)
    out = [
        {"answerable": bool(e.meta["answerable"]), "gold": e.meta.get("doc_id"), "shown": list(e.meta["passages"])}
        for e in rows
    ]
    for (r, shown, _), (margin, logp) in zip(jobs, got):
        out[r].setdefault("views", []).append({"shown": shown, "margin": margin, "numbers": logp[: len(shown)]})
    return out


def decided(row: dict, pooled: str | None) -> tuple[float, str]:
    """(refusal margin, cited doc): the prompt's as shown; pooled "mean" (orders): the views' mean margin and most
    probable doc; pooled "min" (singles): a refusal only when every view refuses, the doc of the view least sure of
    refusing (a passage alone that the model cites rescues a refusal)."""

    def doc(view: dict) -> str:
        return view["shown"][max(range(len(view["numbers"])), key=view["numbers"].__getitem__)]

    seen = row["views"]
    if pooled is None:
        return seen[0]["margin"], doc(seen[0])
    if pooled == "min":
        least = min(seen, key=lambda v: v["margin"])
        return least["margin"], doc(least)
    chance: dict[str, float] = {}
    for view in seen:
        for doc_id, logp in zip(view["shown"], view["numbers"]):
            chance[doc_id] = chance.get(doc_id, 0.0) + math.exp(logp) / len(seen)
    return sum(v["margin"] for v in seen) / len(seen), max(chance, key=chance.get)


def gold_out(rows: list[dict]) -> dict:
    """Answerable rows read with their gold passage and without it, at the bias picked as shown."""
    margins = [r["views"][0]["margin"] for r in rows]
    bias, _ = pick(margins, [r["answerable"] for r in rows])
    pairs = [(r["views"][0]["margin"], r["views"][1]["margin"]) for r in rows if len(r["views"]) > 1]
    return {
        "bias": bias,
        "gold_shown_refused": f"{sum(m + bias > 0 for m, _ in pairs)}/{len(pairs)}",
        "gold_replaced_refused": f"{sum(m + bias > 0 for _, m in pairs)}/{len(pairs)}",
        "margin_rose": f"{sum(b > a for a, b in pairs)}/{len(pairs)}",
    }


def auc(scores: list[float], answerable: list[bool]) -> float:
    """How often an unanswerable row scores above an answerable one (ties half)."""
    u = [s for s, a in zip(scores, answerable) if not a]
    o = [s for s, a in zip(scores, answerable) if a]
    return sum((x > y) + 0.5 * (x == y) for x in u for y in o) / max(1, len(u) * len(o))


def first_out(rows: list[dict]) -> dict:
    """Does dropping passage [1] move the decision more where [1] answers? The margin's rise d per row, and the
    ranking of margin − w·d for a few w."""
    answerable = [r["answerable"] for r in rows]
    shown = [r["views"][0]["margin"] for r in rows]
    rise = [r["views"][-1]["margin"] - r["views"][0]["margin"] for r in rows]
    out = {
        "auc_margin": round(auc(shown, answerable), 3),
        "auc_minus_rise": round(auc([-d for d in rise], answerable), 3),
    }
    for w in (0.25, 0.5, 1.0):
        out[f"auc_margin-{w}rise"] = round(auc([m - w * d for m, d in zip(shown, rise)], answerable), 3)
    for label, keep in (("answerable", True), ("unanswerable", False)):
        ds = sorted(d for d, a in zip(rise, answerable) if a == keep)
        quartiles = [round(ds[int(q * (len(ds) - 1))], 2) for q in (0.25, 0.5, 0.75)] if ds else None
        out[f"rise_{label}_q25/50/75"] = quartiles  # None: no row of that kind in the split
    return out


def summary(rows: list[dict], kind: str) -> dict:
    if kind == "first_out":
        return {"first out": first_out(rows)}
    if kind in GOLD_VIEWS:
        return {kind.replace("_", " "): gold_out(rows)}
    answerable = [r["answerable"] for r in rows]
    out = {}
    for label, pooled in (("as shown", None), ("pooled views", "min" if kind == "singles" else "mean")):
        margins, docs = zip(*(decided(r, pooled) for r in rows))
        bias, _ = pick(list(margins), answerable)
        readable = [(d, r) for d, r in zip(docs, rows) if r["answerable"] and r["gold"] in r["shown"]]
        refused_u, refused_a = refused(list(margins), answerable, bias)
        out[label] = {
            "refusal_auc": round(auc(list(margins), answerable), 3),
            "bias": bias,
            "unanswerable_refused": f"{refused_u}/{answerable.count(False)}",
            "answerable_refused": f"{refused_a}/{answerable.count(True)}",
            "right_doc_when_shown": f"{sum(d == r['gold'] for d, r in readable)}/{len(readable)}",
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--data", type=Path)
    parser.add_argument("--kb", type=Path, default=REPO / "data" / "kb.jsonl")
    parser.add_argument("--views", choices=("orders", "singles", *WIDER_VIEWS), default="orders")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    rows = score(args.run, args.data or args.run / "data", args.kb, args.views)
    result = summary(rows, args.views)
    for label, figures in result.items():
        print(f"{label}: " + ", ".join(f"{k} {v}" for k, v in figures.items()))
    if args.out:
        args.out.write_text(json.dumps({"summary": result, "rows": rows}, ensure_ascii=False), encoding="utf-8")


if __name__ == "__main__":
    main()
