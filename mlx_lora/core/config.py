"""Typed run configuration: dataclasses loaded from YAML, with `--set section.key=value` overrides."""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field

import yaml

from mlx_lora.core.errors import UserError

SCHEDULES = ("cosine", "linear", "constant")  # learning-rate decay after warm-up (training/schedule.py computes it)
# eval.threshold presets: the mean similarity (percent) a variant needs to pass.
PRESETS = {"faq": 85.0, "chatbot": 80.0, "critical": 90.0}


def parse_threshold(value) -> tuple[str, float]:
    """A preset name (faq 85, chatbot 80, critical 90) or a number in 0–100 → (label, percent)."""
    text = str(value).strip().lower()
    if text in PRESETS:
        return text, PRESETS[text]
    try:
        number = float(text)
    except ValueError:
        raise UserError(f"threshold {value!r}: use faq (85), chatbot (80), critical (90) or a number 0–100") from None
    if not 0 <= number <= 100:
        raise UserError(f"threshold {value!r}: a number must be between 0 and 100 (percent similarity)")
    return f"{number:g}", number


@dataclass
class ModelConfig:
    path: str = "embedded"  # "embedded" (Qwen2.5-Coder-0.5B from PyPI wheels), an HF folder, a .gguf, a cached hub id
    cache_dir: str | None = None  # where prepared models live; None → $MLX_LORA_CACHE or ~/.cache/mlx-lora
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16


@dataclass
class BackendConfig:
    name: str = "auto"  # auto | torch | mlx
    device: str = "auto"  # auto | cpu | cuda | mps (torch only)
    threads: int | None = None  # CPU threads; None keeps the library default


@dataclass
class LoraConfig:
    rank: int = 16
    alpha: float = 32.0  # PEFT's lora_alpha; MLX's scale is alpha / rank
    dropout: float = 0.05
    targets: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    num_layers: int | None = None  # LoRA on the last N layers only; None = all layers
    dora: bool = False
    rslora: bool = False


@dataclass
class TrainConfig:
    epochs: int = 3
    max_steps: int | None = None  # optimizer steps; stops earlier than epochs when set
    batch_size: int = 4
    grad_accum: int = 2
    lr: float = 3e-4
    warmup_steps: int = 10
    schedule: str = "cosine"  # cosine | linear | constant
    max_grad_norm: float = 1.0
    weight_decay: float = 0.01
    max_length: int | None = 192  # null: fitted to the rows at training (data/fitting.auto_max_length)
    eval_every: int = 0  # optimizer steps between evals; 0 = once per epoch
    early_stopping_patience: int = 0  # evals without improvement before stopping; 0 = off
    seed: int = 42
    out: str = "runs/latest"
    # fp32 | bf16 | auto. bf16 keeps the frozen base weights in bf16 (LoRA weights, optimizer state and the loss
    # stay fp32); auto measures once whether this machine's bf16 matmuls beat fp32 (CPUs with avx512_bf16 or AMX;
    # CUDA with bf16) and picks. On an avx512_bf16 CPU the main job trained 1.46x faster with the same valid loss
    # (+0.2%) and the same tuned+rules figures; AVX2-only CPUs emulate bf16 (7-10x slower), so auto keeps fp32.
    # fp32 stays the default: bf16 on the CPU is not bit-reproducible from one process to the next (the same run
    # twice: eval losses apart in the 5th digit), so a killed run would not resume to the same adapter.
    precision: str = "fp32"
    # Loss weight of each answer's first token (1 = a plain mean over answer tokens). In grounded mode that token
    # is the decision — "[" to cite a passage or the refusal's first character — and the rest of the answer is a
    # copy the model learns in a few steps: at weight 1 a 40-step adapter fitted the copies (loss ~0.005) while the
    # refusal's first token kept a loss of 2.3-3.5 on its own training rows, one token in ~45 per row.
    # null: the weight that gives those tokens a fixed share of the loss, whatever the answers' length
    # (data/batching.decision_weight).
    first_token_weight: float | None = 1.0
    # How many of each answer's leading tokens carry first_token_weight. With numbered citations the answer opens
    # "[", "2", "]": the second token is the choice of passage, a decision too.
    first_tokens: int = 1
    # none | tensorboard: also write the training events' scalars as TensorBoard event files into RUN/tensorboard/
    # (the `tensorboard` extra; nothing is imported when none).
    report_to: str = "none"


@dataclass
class DataConfig:
    kb: str = "data/kb.jsonl"
    questions: str = "data/questions.yaml"
    dir: str = "runs/data"  # where `data build` writes train/valid/test.jsonl
    seed: int = 42
    answerable_ratio: float = 0.75  # share of answerable rows in train
    valid_fraction: float = 0.1  # of each doc's phrasings (and of the unanswerable pool)
    test_fraction: float = 0.2
    system_prompt: str | None = "你是公司內部 FAQ 助理,只依據公司規範回答。"
    answer_prefix: str = "依據公司規範:"
    format: str = "messages"  # messages | text (ChatML text rows)
    extra_questions: str | None = None  # YAML of extra training questions (e.g. from `diagnose`)
    # Where the question bank has fewer unique unanswerable questions than answerable_ratio needs in train, fill
    # the rest with general off-topic questions from a built-in pool (data/off_topic.txt: chit-chat, arithmetic,
    # translation, trivia…; those close to the KB or to a valid/test question dropped) instead of repeating them.
    off_topic: bool = True
    # closed_book: the question alone, the model answers from what it memorised. grounded: the question with the
    # top-k KB passages the retriever finds (data/retrieval.py), the answer cites the passage it used.
    mode: str = "closed_book"
    passages: int = 3  # grounded: passages per prompt
    # grounded: how an answer says which passage it used, "[<label>] <answer>": number (the passage's place in the
    # prompt, 1..k; the decision layer maps it back to the doc) or doc_id (the doc's id, which a LoRA can tie to
    # the topics it trained on instead of reading). number measured better on valid at two seeds
    # (benchmarks/results/grounded/README.md).
    cite: str = "number"
    passage_template: str = "[{label}] {text}"  # grounded: one passage; {label} is what the answer cites
    grounded_template: str = "參考資料:\n{passages}\n問題:{question}"  # grounded: the user turn
    # grounded, RAFT-style: the share of answerable train rows that see their gold passage; in the others it is
    # replaced by the next retrieved one and the row answers by data.oracle_free. 0.8 with "refuse" (hard
    # negatives) refused 93.8% of valid's unanswerable questions after 160 steps, against 68.8% at 1.0
    # (benchmarks/results/grounded/README.md). "answer" (from memory) measured worse: at one of two seeds the
    # adapter answered half of valid's unanswerable questions (an answer for passages that do not answer is the
    # same kind of prompt as an unanswerable question's refusal).
    oracle_rate: float = 0.8
    oracle_free: str = "refuse"  # refuse (a hard negative) | answer (from memory, citing the gold doc)
    shuffle_passages: bool = False  # grounded: show train rows' passages in a seeded random order
    # grounded: the share of train rows with the gold passage first that see it moved to a later place (against
    # "always cite [1]"). 0.3 scored 90.0 / 92.7 on valid at two seeds against 94.7 / 94.6 at 0: off by default.
    move_gold: float = 0.0
    # grounded: the share of answerable train rows that see only the part of their gold passage least related to
    # the question and answer the refusal (a near-miss made from an answerable question: on topic, no answer).
    # Out of fold (train on 4/5 of the train questions, score the held fifth; 3 folds, 273 rows, the main job's
    # recipe) 0.15 took the model alone 89.9 → 93.0 and unanswerable refused 40 → 56 of 67 — but questions about
    # docs added after training were refused 62.5% of the time instead of 11.2% (alone 82.5 → 63.6): a cut passage
    # is a text the model never saw whole, and so is a new doc's. Off until that is fixed
    # (benchmarks/results/grounded/README.md).
    near_miss_rate: float = 0.0
    # grounded: the most tokens a prompt may take (everything but the answer). null: set by training to
    # train.max_length less the longest answer of the train and valid rows, and kept with the run, so that a
    # prompt at inference (eval, generate, serve) drops or shortens passages exactly as training did: trained on
    # two passages and shown three, an adapter refused 19 of 28 answerable valid questions it answered (27 of 28)
    # in the shorter form (a second KB with longer texts; benchmarks/kb2).
    prompt_tokens: int | None = None


@dataclass
class GenerateConfig:
    # null: half again the longest answer the run was trained on (backends/loading.answer_budget), so a KB with
    # longer answers is not cut short; 150 where no run says. The default, so that `eval --adapter RUN` without a
    # config follows the run (a fixed 150 cut a 383-token answer).
    max_new_tokens: int | None = None
    temperature: float = 0.0  # 0 = greedy (evaluation is always greedy)
    top_p: float = 0.9
    repetition_penalty: float = 1.0
    batch_size: int = 32
    # torch: auto casts the loaded model (base and adapter) to bf16 before generating where this CPU's bf16 matmuls
    # beat fp32 (the probe train.precision uses); CUDA models already load in bf16. fp32 | bf16 force it.
    precision: str = "auto"
    # torch, greedy: check up to this many tokens per step that the prompt predicts (a grounded answer copies its
    # passage): one pass keeps every drafted token greedy decoding agrees with. 0 = off (backends/torch/lookup.py)
    prompt_lookup: int = 8
    # Added to the logit of the refusal's first token at the first new token: > 0 refuses more often, < 0 less.
    # None = the run's own, calibrated on its valid split after training (calibration.json; 0 where it has none).
    # Set when training, the run keeps it as its own without the scoring pass.
    refusal_bias: float | None = None


@dataclass
class EvalConfig:
    threshold: str = "faq"  # faq (85) | chatbot (80) | critical (90) | a number
    embedder: str = "use"  # use (multilingual USE v3, offline) | char | a sentence-transformers model path/id
    worst_n: int = 10
    max_rows: int | None = None  # evaluate a seeded sample of the test split; None = all rows


@dataclass
class RulesConfig:
    path: str | None = "configs/rules.yaml"
    kb_match_threshold: float = 0.8
    route_high: float | None = None  # semantic route: KB answer at topic probability ≥ this; None = calibrate
    route_low: float | None = None  # refuse below this similarity to anything known; None = calibrate
    answerability: bool = True  # refuse a KB answer whose doc does not answer the question (answerability.py)
    answer_floor: float | None = None  # answerability score below which it refuses; None = calibrate
    # (calibration: out-of-fold on the train + valid questions, calibration.calibrate_route)
    audit_log: str = "audit.jsonl"


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    backend: BackendConfig = field(default_factory=BackendConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    rules: RulesConfig = field(default_factory=RulesConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def field_types(cls) -> dict[str, typing.Any]:
    return typing.get_type_hints(cls)


def _coerce(value, annotation, key: str):
    """Check/convert one YAML value against its annotation; YAML 1.1 reads `3e-4` as a string, so floats parse."""
    args = typing.get_args(annotation)
    if type(None) in args:
        if value is None:
            return None
        (annotation,) = [a for a in args if a is not type(None)]
    origin = typing.get_origin(annotation)
    if origin is list:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            raise UserError(f"config key {key}: expected a list, got {value!r}")
        (item,) = typing.get_args(annotation)
        if item is str and not all(isinstance(v, str) for v in value):  # [1, 2] for module names is a slip
            raise UserError(f"config key {key}: expected a list of names, got {value!r}")
        return [_coerce(v, item, key) for v in value]
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "on", "off", "1", "0"):
            return value.lower() in ("true", "yes", "on", "1")
    elif annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lstrip("-").isdigit():
            return int(value)
    elif annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif annotation is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    name = getattr(annotation, "__name__", str(annotation))
    raise UserError(f"config key {key}: expected {name}, got {value!r}")


def _apply_section(section_obj, values: dict, section: str, source: str) -> None:
    types = field_types(type(section_obj))
    for key, value in values.items():
        if key not in types:
            valid = ", ".join(types)
            raise UserError(f"{source}: unknown config key {section}.{key}; valid keys in {section}: {valid}")
        try:
            setattr(section_obj, key, _coerce(value, types[key], f"{section}.{key}"))
        except UserError as exc:
            raise UserError(f"{source}: {exc}") from None


# Allowed values, checked once after every source is applied, so a bad value stops a command before any work.
CHOICES = {
    "model.dtype": ("auto", "float32", "bfloat16", "float16"),
    "backend.name": ("auto", "torch", "mlx"),
    "backend.device": ("auto", "cpu", "cuda", "mps"),
    "train.schedule": SCHEDULES,
    "train.precision": ("auto", "fp32", "bf16"),
    "generate.precision": ("auto", "fp32", "bf16"),
    "train.report_to": ("none", "tensorboard"),
    "data.format": ("messages", "text"),
    "data.mode": ("closed_book", "grounded"),
    "data.oracle_free": ("refuse", "answer"),
    "data.cite": ("number", "doc_id"),
}
# key → (lowest, highest or None, whether each end itself is allowed, what the key is).
RANGES = {
    "backend.threads": (1, None, (True, False), "CPU threads"),
    "lora.rank": (1, None, (True, False), "LoRA rank"),
    "lora.alpha": (0, None, (False, False), "LoRA alpha (scale = alpha / rank)"),
    "lora.dropout": (0, 1, (True, False), "a probability"),
    "lora.num_layers": (1, None, (True, False), "the number of last layers that get LoRA"),
    "train.epochs": (1, None, (True, False), "epochs"),
    "train.max_steps": (1, None, (True, False), "optimizer steps"),
    "train.batch_size": (1, None, (True, False), "rows per micro-batch"),
    "train.grad_accum": (1, None, (True, False), "micro-batches per optimizer step"),
    "train.lr": (0, None, (False, False), "the learning rate"),
    "train.warmup_steps": (0, None, (True, False), "warm-up steps"),
    "train.max_grad_norm": (0, None, (True, False), "the gradient-norm clip (0 = off)"),
    "train.weight_decay": (0, None, (True, False), "weight decay"),
    "train.max_length": (2, None, (True, False), "tokens per row"),
    "train.first_token_weight": (1, None, (True, False), "an answer's first-token loss weight; null = a share"),
    "train.first_tokens": (1, None, (True, False), "the answer tokens that carry first_token_weight"),
    "train.eval_every": (0, None, (True, False), "optimizer steps between evals (0 = once per epoch)"),
    "train.early_stopping_patience": (0, None, (True, False), "evals without improvement (0 = off)"),
    "data.answerable_ratio": (0, 1, (False, True), "the share of answerable train rows"),
    "data.passages": (1, None, (True, False), "passages per grounded prompt"),
    "data.oracle_rate": (0, 1, (True, True), "the share of answerable grounded rows that see their gold passage"),
    "data.move_gold": (0, 1, (True, True), "the share of grounded train rows whose first-place gold passage moves"),
    "data.near_miss_rate": (0, 1, (True, True), "the share of answerable grounded rows shown a passage cut short"),
    "data.prompt_tokens": (1, None, (True, False), "tokens a grounded prompt may take; null = set by training"),
    "data.valid_fraction": (0, 1, (True, False), "the share of phrasings held out for validation"),
    "data.test_fraction": (0, 1, (True, False), "the share of phrasings held out for testing"),
    "generate.max_new_tokens": (1, None, (True, False), "tokens to generate; null = from the run's answers"),
    "generate.temperature": (0, None, (True, False), "the sampling temperature (0 = greedy)"),
    "generate.top_p": (0, 1, (False, True), "nucleus sampling mass"),
    "generate.repetition_penalty": (0, None, (False, False), "the repetition penalty (1 = off)"),
    "generate.batch_size": (1, None, (True, False), "prompts decoded together"),
    "generate.prompt_lookup": (0, None, (True, False), "drafted tokens checked per step (0 = off)"),
    "generate.refusal_bias": (-20, 20, (True, True), "a logit bias; null = the run's calibrated one"),
    "eval.worst_n": (0, None, (True, False), "worst cases listed"),
    "eval.max_rows": (1, None, (True, False), "test rows to sample; null = all"),
    "rules.kb_match_threshold": (0, 1, (True, True), "a similarity"),
    "rules.route_high": (0, 1, (True, True), "a probability; null = calibrate"),
    "rules.route_low": (-1, 1, (True, True), "a similarity; null = calibrate"),
}


def validate(cfg: Config) -> Config:
    """Enumerations and ranges of every key; the first problem is a one-line error naming the key."""
    for dotted, allowed in CHOICES.items():
        section, key = dotted.split(".")
        value = getattr(getattr(cfg, section), key)
        if value not in allowed:
            raise UserError(f"config key {dotted}: {value!r} is not one of {', '.join(allowed)}")
    for dotted, (low, high, (low_ok, high_ok), meaning) in RANGES.items():
        section, key = dotted.split(".")
        value = getattr(getattr(cfg, section), key)
        if value is None:
            continue
        bad = not math.isfinite(value) or (value < low if low_ok else value <= low)
        if high is not None:
            bad = bad or (value > high if high_ok else value >= high)
        if bad:
            lower = f"{'≥' if low_ok else '>'} {low}"
            wanted = lower if high is None else f"in {'[' if low_ok else '('}{low}, {high}{']' if high_ok else ')'}"
            raise UserError(f"config key {dotted}: {value!r} must be {wanted} ({meaning})")
    if cfg.data.valid_fraction + cfg.data.test_fraction >= 1:
        raise UserError("config keys data.valid_fraction + data.test_fraction must add up to less than 1")
    # A passage shows what the answer cites: {label} (the cited label in either mode) or the mode's own field.
    cited = ("label", "n" if cfg.data.cite == "number" else "doc_id")
    for key, fields, needed in (
        ("passage_template", ("label", "n", "doc_id", "text"), (cited, ("text",))),
        ("grounded_template", ("passages", "question"), (("passages",), ("question",))),
    ):
        template = getattr(cfg.data, key)
        try:
            template.format(**{f: "" for f in fields})
        except (KeyError, IndexError, ValueError) as exc:
            raise UserError(
                f"config key data.{key}: {template!r} is not a template of {{{'}, {'.join(fields)}}} ({exc!r})"
            ) from None
        missing = [" or ".join("{" + f + "}" for f in any_of) for any_of in needed]
        missing = [m for m, any_of in zip(missing, needed) if not any("{" + f + "}" in template for f in any_of)]
        if missing:
            by_id = "{n}" in missing[0] and "{doc_id}" in template  # a template written for doc-id citations
            hint = " (or set data.cite: doc_id to cite doc ids)" if by_id else ""
            raise UserError(f"config key data.{key}: must contain {' and '.join(missing)}{hint}")
    if not cfg.lora.targets:
        raise UserError("config key lora.targets: name at least one module, e.g. [q_proj, v_proj]")
    try:
        parse_threshold(cfg.eval.threshold)
    except UserError as exc:
        raise UserError(f"config key eval.threshold: {exc}") from None
    return cfg


def apply_mapping(cfg: Config, mapping: dict, source: str) -> Config:
    sections = field_types(Config)
    if not isinstance(mapping, dict):
        raise UserError(f"{source}: expected a mapping of sections ({', '.join(sections)})")
    for section, values in mapping.items():
        if section not in sections:
            raise UserError(f"{source}: unknown config section {section!r}; valid sections: {', '.join(sections)}")
        if values is None:
            continue
        if not isinstance(values, dict):
            raise UserError(f"{source}: section {section} must be a mapping of keys, got {values!r}")
        _apply_section(getattr(cfg, section), values, section, source)
    return cfg


def parse_override(text: str) -> tuple[str, str, object]:
    """`train.lr=3e-4` → ("train", "lr", "3e-4" parsed as YAML)."""
    if "=" not in text or "." not in text.split("=", 1)[0]:
        raise UserError(f"--set {text!r}: expected section.key=value, e.g. --set train.lr=3e-4")
    dotted, raw = text.split("=", 1)
    section, key = dotted.strip().split(".", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return section, key, value
