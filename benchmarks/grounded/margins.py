"""Out-of-fold check of the refusal bias (mlx_lora/training/refusal_bias.py) without retraining: per fold run (fold.sh),
score the first answer token of its valid and held questions, pick the bias on valid as training does, and count
held questions refused without and with it.

    python benchmarks/grounded/margins.py FOLDS_DIR NAME [--folds 0,1,2,3,4] [--kb KB] [--out margins.json]

FOLDS_DIR is folds.py's output; NAME the fold.sh run name (/tmp/fr/NAME-fF). Held prompts are rebuilt from the fold's
own train questions, as `eval` builds them, and every prompt is fitted to the run's budget (data.prompt_tokens) as
training and `eval` fit theirs: on a KB of longer texts (kb2) most prompts show two passages, not the three a built
row holds.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from mlx_lora.backends.loading import load_for_generation
from mlx_lora.core.config import Config
from mlx_lora.data.fitting import fit_prompts, prompt_length
from mlx_lora.data.formats import read_examples
from mlx_lora.data.grounded import reground
from mlx_lora.data.kb import load_kb
from mlx_lora.data.similarity import make_scorer
from mlx_lora.evaluation.run import passage_index
from mlx_lora.training.refusal_bias import pick, refusal_token, refused

REPO = Path(__file__).resolve().parents[2]


def fold_margins(run: Path, fold: Path, kb, scorer) -> dict:
    cfg = Config()
    cfg.backend.name = "torch"
    backend, loaded, tok, system = load_for_generation(None, run, cfg, progress=False)
    train = read_examples(fold / "train.jsonl")
    index = passage_index(scorer, kb, train)
    _, token = refusal_token(tok, train)
    data = cfg.data  # load_for_generation put the run's prompt settings there (its budget, data.prompt_tokens, too)
    out = {}
    for split in ("valid", "held"):
        rows = read_examples(fold / f"{split}.jsonl")
        if split == "held":
            rows = reground(rows, index, data)
        rows = fit_prompts(rows, index.kb_texts, data, prompt_length(tok))
        prompts = [tok.prompt_ids(e.prompt_messages(), system) for e in rows]
        out[split] = {
            "margins": backend.token_margins(loaded, prompts, cfg.generate, token),
            "answerable": [bool(e.meta["answerable"]) for e in rows],
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folds_dir", type=Path)
    parser.add_argument("name")
    parser.add_argument("--folds", default="0,1,2,3,4")
    parser.add_argument("--kb", type=Path, default=REPO / "data" / "kb.jsonl")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    kb, scorer = load_kb(args.kb), make_scorer("use")
    results, totals = {}, {"unbiased": [0, 0], "calibrated": [0, 0]}
    for f in args.folds.split(","):
        got = fold_margins(Path(f"/tmp/fr/{args.name}-f{f}"), args.folds_dir / f"fold-{f}", kb, scorer)
        bias, _ = pick(got["valid"]["margins"], got["valid"]["answerable"])
        held = got["held"]
        line = {}
        for label, b in (("unbiased", 0.0), ("calibrated", bias)):
            counts = refused(held["margins"], held["answerable"], b)
            totals[label] = [t + c for t, c in zip(totals[label], counts)]
            line[label] = counts
        n_unans = held["answerable"].count(False)
        print(
            f"fold {f}: bias {bias:+g}; held unanswerable refused {line['unbiased'][0]} -> {line['calibrated'][0]} "
            f"of {n_unans}, answerable refused {line['unbiased'][1]} -> {line['calibrated'][1]} of "
            f"{len(held['answerable']) - n_unans}"
        )
        results[f] = {"bias": bias, **got, "counts": line}
    print(f"pooled (unanswerable refused, answerable refused): {totals}")
    if args.out:
        args.out.write_text(json.dumps({"folds": results, "pooled": totals}), encoding="utf-8")


if __name__ == "__main__":
    main()
