"""The evaluation variants in one place: their names in report order, what each needs, and the default selection."""

from __future__ import annotations

# Every variant, in the report's order. Two baselines need no model: "retrieval" answers with the nearest training
# question's answer, "top_passage" with the retriever's best passage (what reading adds over retrieving).
VARIANTS = ("base", "tuned", "tuned_rules", "base_rules", "retrieval", "top_passage")
# Variant → the model whose greedy answers it scores: "tuned" is the base model plus the adapter. The retrieval
# baseline needs no model (the answer of the nearest training question).
MODEL_OF = {"base": "base", "tuned": "tuned", "tuned_rules": "tuned", "base_rules": "base"}
# Variants whose final answers come from the answer decider (keyword rules, route, answerability, model checks)
# applied to their model's answers.
DECIDED = ("tuned_rules", "base_rules")
NEED_ADAPTER = tuple(v for v in VARIANTS if MODEL_OF.get(v) == "tuned")  # tuned, tuned_rules
GENERATION_ORDER = ("tuned", "base")  # the order the models generate in when both are needed
DEFAULT_WITH_ADAPTER = ("base", "tuned", "tuned_rules", "retrieval", "top_passage")
DEFAULT_WITHOUT_ADAPTER = ("base", "base_rules", "retrieval", "top_passage")
BASELINES = ("retrieval", "top_passage")  # no adapter: the decider runs on base answers
# `diagnose` without --variant diagnoses the first of these that its report holds.
DIAGNOSE_PREFERENCE = ("tuned", "base", "tuned_rules", "retrieval")


def default_variants(adapter) -> tuple[str, ...]:
    """The variants evaluated when none are named: the tuned ones only when there is an adapter."""
    return DEFAULT_WITH_ADAPTER if adapter else DEFAULT_WITHOUT_ADAPTER


def models_for(variants) -> tuple[str, ...]:
    """The models ("tuned", "base") whose answers the given variants need, in generation order."""
    wanted = {MODEL_OF[v] for v in variants if v in MODEL_OF}
    return tuple(m for m in GENERATION_ORDER if m in wanted)
