"""The run's refusal bias: how far to shift its cite-or-refuse decision, calibrated on the valid split after training.

A grounded (or closed-book) adapter decides to refuse with its answer's first token. Where that decision sits moves
with the seed: five adapters of one recipe, trained on five folds of the sample's train split, answered between
2 and 14 of ~22 held-out unanswerable questions each while refusing 0 to 4 of ~69 answerable ones. Adding a bias
b to the refusal's first-token logit moves the decision without retraining; it is chosen where it turns the
most valid rows right: unanswerable ones refused minus answerable ones refused (each turn is worth about the
same similarity either way: a refused answerable row scores ~34, an answered unanswerable one ~34).
"""

from __future__ import annotations

from pathlib import Path

from mlx_lora.backends.loading import CALIBRATION
from mlx_lora.core.config import Config
from mlx_lora.core.files import write_json
from mlx_lora.data.formats import taught_refusal
from mlx_lora.data.render import ChatTokenizer, encode_messages

FILE = CALIBRATION  # in the run folder, beside manifest.json; backends/loading.py reads it
# Biases tried, in logits. Confident answers' margins cluster near 4, so past 3 the bias refuses answerable rows
# wholesale. None below 0: of those five folds, the two whose valid split over-refused picked -0.25 and -1.5, and
# on their held questions then answered 2 and 10 more unanswerable ones for one answerable one fewer refused each.
GRID = [b / 4 for b in range(0, 13)]


def refused(margins: list[float], answerable: list[bool], bias: float) -> tuple[int, int]:
    """(unanswerable rows refused, answerable rows refused) when greedy decoding sees `bias` added to the
    refusal's first-token logit: a row refuses where its margin plus the bias is above 0."""
    refuses = [m + bias > 0 for m in margins]
    return (
        sum(r for r, a in zip(refuses, answerable) if not a),
        sum(r for r, a in zip(refuses, answerable) if a),
    )


def pick(margins: list[float], answerable: list[bool]) -> tuple[float, dict]:
    """(the bias that refuses the most unanswerable rows net of answerable ones — the smallest |b| among equals,
    so no evidence means no shift; the counts at b = 0 and at the bias)."""
    counts = {b: refused(margins, answerable, b) for b in GRID}
    best = max(GRID, key=lambda b: (counts[b][0] - counts[b][1], -abs(b), -b))
    before, after = counts[0.0], counts[best]
    n_unanswerable = answerable.count(False)
    return best, {
        "rows": len(margins),
        "unanswerable": n_unanswerable,
        "unanswerable_refused": {"unbiased": before[0], "biased": after[0]},
        "answerable_refused": {"unbiased": before[1], "biased": after[1]},
    }


def label(example) -> bool | None:
    """True/False: a chat row known to be answerable or not; None: no label (not calibrated on)."""
    answerable = (example.meta or {}).get("answerable")
    return answerable if example.messages and answerable in (True, False) else None


def _labelled(examples) -> list:
    return [e for e in examples if label(e) is not None]


def refusal_token(tokenizer: ChatTokenizer, examples) -> tuple[str, int] | None:
    """(the refusal the chat rows taught, its first token as training rendered it); None when none teaches one."""
    rows = _labelled(examples)
    refusal = taught_refusal(rows)
    if refusal is None:
        return None
    sample = next(e for e in rows if e.meta["answerable"] is False and e.answer == refusal)
    encoded = encode_messages(tokenizer, sample.messages, 10**9)
    return refusal, encoded.ids[encoded.mask.index(1)]


def calibrate(
    backend,
    model_dir: Path,
    run_dir: Path,
    valid,
    train,
    tokenizer: ChatTokenizer,
    cfg: Config,
    scored: tuple[list[float], list[bool | None]] | None = None,
) -> dict | None:
    """Pick the bias from the valid rows' first-answer-token margins for the saved adapter, write
    run_dir/calibration.json and return it. `scored` = (margins, label per row) from training's own valid pass
    over that adapter; without it the rows are scored again, the adapter loaded as generation loads it. A
    generate.refusal_bias set at training is written as it is, unscored. None (and no file) when no row teaches a
    refusal, or nothing was set and valid lacks answerable or unanswerable chat rows to calibrate on."""
    rows = _labelled(valid)
    found = refusal_token(tokenizer, [*valid, *train])
    if found is None:
        return None
    refusal, token = found
    result = {"token": token, "token_text": tokenizer.decode([token]), "refusal": refusal}
    if cfg.generate.refusal_bias is not None:
        result.update(refusal_bias=cfg.generate.refusal_bias, chosen_by="generate.refusal_bias")
    else:
        answerable = [e.meta["answerable"] for e in rows]
        if all(answerable) or not any(answerable):
            return None
        pairs = [(m, a) for m, a in zip(*scored) if a is not None] if scored is not None else []
        if pairs:
            margins, answerable = [m for m, _ in pairs], [a for _, a in pairs]
        else:
            loaded = backend.load(model_dir, run_dir / "adapter", cfg)
            prompts = [tokenizer.prompt_ids(e.prompt_messages(), cfg.data.system_prompt) for e in rows]
            margins = backend.token_margins(loaded, prompts, cfg.generate, token)
        bias, figures = pick(margins, answerable)
        result.update(refusal_bias=bias, chosen_by="valid", valid=figures)
    write_json(run_dir / FILE, result)
    return result


def describe_bias(calibration: dict) -> str:
    """One line: the bias and what it changed on the valid split (or that the config set it)."""
    if "valid" not in calibration:
        return f"{calibration['refusal_bias']:+g} on {calibration['token_text']!r} (set by generate.refusal_bias)"
    v = calibration["valid"]
    answerable = v["rows"] - v["unanswerable"]
    return (
        f"{calibration['refusal_bias']:+g} on {calibration['token_text']!r} (valid: unanswerable refused "
        f"{v['unanswerable_refused']['unbiased']} -> {v['unanswerable_refused']['biased']} of {v['unanswerable']}, "
        f"answerable refused {v['answerable_refused']['unbiased']} -> {v['answerable_refused']['biased']} of "
        f"{answerable})"
    )
