"""What `generate --rules` and `serve` build from a run folder: its splits, the answer decider, the grounded prompt."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from mlx_lora.answer.build import build_decider, deleted_note, doc_answers, refusal_text
from mlx_lora.answer.decide import Decider, Decision
from mlx_lora.backends.loading import read_manifest
from mlx_lora.core.config import Config, DataConfig
from mlx_lora.data.fitting import fitted_turn, prompt_length
from mlx_lora.data.formats import read_examples
from mlx_lora.data.grounded import retrieve, with_doc_id
from mlx_lora.data.kb import load_kb
from mlx_lora.data.retrieval import PassageIndex
from mlx_lora.data.similarity import answer_index, make_scorer


def train_file(cfg: Config, adapter) -> Path:
    """The train split the run learned from (its manifest names it), else data.dir's."""
    if adapter and Path(adapter, "manifest.json").is_file():
        files = read_manifest(Path(adapter)).get("data", {}).get("files") or []
        if files and Path(files[0]).is_file():
            return Path(files[0])
    return Path(cfg.data.dir) / "train.jsonl"


def run_splits(cfg: Config, adapter) -> tuple[list, list]:
    """(train, valid) examples of the run: the route learns from train, calibrates on train + valid."""
    train_path = train_file(cfg, adapter)
    train = read_examples(train_path) if train_path.is_file() else []
    valid_path = train_path.with_name("valid.jsonl")
    valid = read_examples(valid_path) if valid_path.is_file() else []
    return train, valid


@dataclass(frozen=True)
class Answering:
    """One immutable answering setup: today's KB and rules, the decider built on them and, for a grounded run, the
    passage retriever its prompts read. Replaced whole (never changed) when the rules or the KB are reloaded."""

    decider: Decider
    info: dict
    data: DataConfig
    passages: PassageIndex | None = None  # grounded runs only
    length: object = None  # grounded: prompt_length(the model's tokenizer), to fit prompts as training did
    system_prompt: str | None = None
    kb_docs: int = 0
    rules: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def grounded(self) -> bool:
        return self.passages is not None

    def prompt(self, question: str) -> tuple[str, list[str]]:
        """(the user message the model reads: the question, or in grounded mode the question with its passages;
        the doc ids of the passages it shows: none when closed-book)."""
        if self.passages is None:
            return question, []
        return grounded_prompt(self.passages, question, self.data, self.length, self.system_prompt)

    def with_doc_id(self, answer: str, shown: list[str]) -> str:
        """The model's answer citing the doc id of the passage it cites (a numbered citation names a passage of
        its own prompt, `shown`)."""
        return with_doc_id(answer, shown, self.data)

    def settled(self, questions: list[str]) -> list[Decision | None]:
        return self.decider.settled(questions)

    def decide(self, questions: list[str], model_answers: list[str | None]) -> list[Decision]:
        return self.decider.decide(questions, model_answers)


def grounded_prompt(
    index: PassageIndex, question: str, data: DataConfig, length=None, system_prompt: str | None = None
) -> tuple[str, list[str]]:
    """(the grounded user turn: the question with the passages the retriever finds for it, as training built it —
    fitted to the run's data.prompt_tokens when `length` (prompt_length of the model's tokenizer) is given; the doc
    ids of the passages it shows)."""
    return fitted_turn(question, retrieve(index, [question], data)[0], data, length, system_prompt)


def grounding(cfg: Config, adapter, scorer=None, kb=None, train=None):
    """The passage index grounded prompts read: today's KB (data.kb) and the run's train questions, as training
    and `eval` build it."""
    kb = load_kb(cfg.data.kb) if kb is None else kb
    train = run_splits(cfg, adapter)[0] if train is None else train
    scorer = make_scorer(cfg.eval.embedder) if scorer is None else scorer
    return PassageIndex.from_examples(scorer, {d: doc.text for d, doc in kb.items()}, train)


def build_answering(
    cfg: Config, adapter, rules_path, scorer=None, splits=None, tokenizer=None, system_prompt: str | None = None
) -> Answering:
    """The decider `generate --rules` and `serve` use: keyword rules (rules_path, or None), the semantic route
    trained on the run's train split and calibrated on train + valid, the answerability check; with a grounded
    run (cfg.data.mode after the run's prompt settings were applied), the retriever its prompts read.

    `scorer` and `splits` may be passed in to reuse them (a reload re-reads only the rules and the KB); the loaded
    model's `tokenizer` and system prompt fit grounded prompts to the run's budget (data.prompt_tokens)."""
    kb = load_kb(cfg.data.kb)
    train, valid = run_splits(cfg, adapter) if splits is None else splits
    answers_by_doc = doc_answers(kb, train, cfg.data.answer_prefix)
    refusal = refusal_text(train, cfg)
    scorer = make_scorer(cfg.eval.embedder) if scorer is None else scorer
    index = answer_index(scorer, answers_by_doc, refusal)
    grounded = cfg.data.mode == "grounded"  # a grounded model's cited answers come first (answer/decide.py)
    decider, info = build_decider(
        cfg, scorer, kb, train, valid, answers_by_doc, refusal, index, rules_path, model_first=grounded
    )
    notes = [] if train else ["the run has no train split: no semantic route, keyword rules only"]
    notes += [note] if (note := deleted_note(info, cfg.data.kb)) else []
    passages = grounding(cfg, adapter, scorer, kb, train) if grounded else None
    length = prompt_length(tokenizer) if grounded and tokenizer is not None else None
    data = dataclasses.replace(cfg.data)
    return Answering(decider, info, data, passages, length, system_prompt, len(kb), info["rules"]["count"], notes)
