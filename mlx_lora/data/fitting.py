"""Grounded prompts fitted to a token budget — fewer or shortened passages, never a shorter answer — the same way
in training (every train and valid row) and at inference (eval, generate, serve): data.prompt_tokens, set by
training to train.max_length less the longest answer and kept with the run."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from mlx_lora.core.config import Config, DataConfig
from mlx_lora.data.formats import Example, encode_example, encode_rows, length_warnings, read_examples
from mlx_lora.data.grounded import last_assistant, last_user, recited, user_turn
from mlx_lora.data.render import ChatTokenizer

# train.max_length null (the main job's setting) on a KB of short texts: the sample KB's three passages whole (its
# longest grounded row is 300 tokens); on the library KB (benchmarks/kb2, rows up to 356) as good as 384 was.
AUTO_MAX_LENGTH = 320


def fit_passages(example, kb_texts: dict[str, str], cfg: DataConfig, length, limit: int, keep_gold: bool = True):
    """A grounded row (formats.Example) that fits `limit` tokens (`length(example)` counts them) by showing less
    of its passages, never less of its answer: first the lowest-ranked passages go — with keep_gold, never the gold
    doc's (a training row's answer cites it) — (one passage always stays), then the remaining passage's text is cut
    at the end ("…").

    Returns (row, what happened): "fits" (unchanged), "shortened", or "kept" — not grounded, its prompt is not the
    one today's KB gives (it cannot be rebuilt safely), or even an empty passage does not fit; a kept row is cut
    from the end like any other and the caller warns about it."""
    if length(example) <= limit:
        return example, "fits"
    current = _current_turn(example, kb_texts, cfg)
    if current is None:
        return example, "kept"

    def with_passages(passages):
        return _showing(example, current, passages, cfg)

    ids = example.meta["passages"]
    passages = [(d, kb_texts[d]) for d in ids]
    gold = example.meta.get("doc_id") if keep_gold else None
    while len(passages) > 1:
        drop = max((i for i, (d, _) in enumerate(passages) if d != gold), default=None)
        if drop is None:
            break
        passages.pop(drop)
        row = with_passages(passages)
        if length(row) <= limit:
            return row, "shortened"
    # One passage left (or only gold ones): keep the longest start of the longest text that fits.
    i = max(range(len(passages)), key=lambda j: len(passages[j][1]))
    doc_id, text = passages[i]

    def cut(n: int):
        return with_passages([*passages[:i], (doc_id, text[:n] + "…"), *passages[i + 1 :]])

    if length(cut(0)) > limit:
        return example, "kept"
    lo, hi = 0, len(text)  # cut(lo) fits; the longest n that fits, by bisection
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if length(cut(mid)) <= limit:
            lo = mid
        else:
            hi = mid - 1
    return cut(lo), "shortened"


def _current_turn(example, kb_texts: dict[str, str], cfg: DataConfig) -> str | None:
    """A grounded row's user turn as today's KB builds it from the passages the row shows; None when the row is not
    grounded or its prompt is not that turn (it cannot be rebuilt with other passages safely)."""
    ids = example.meta.get("passages") if example.grounded else None
    if not ids or any(doc_id not in kb_texts for doc_id in ids):
        return None
    current = user_turn(example.question, [(d, kb_texts[d]) for d in ids], cfg)
    shown = [example.text, None if example.messages is None else last_user(example.messages)["content"]]
    if any(current not in text for text in shown if text is not None):  # every copy of the prompt must hold it
        return None
    return current


def _showing(example, current: str, passages, cfg: DataConfig):
    """The row with `passages` in place of the ones its user turn (`current`) shows."""
    turn = user_turn(example.question, passages, cfg)
    shown = [d for d, _ in passages]
    meta = {**example.meta, "passages": shown, "passages_shortened": True}
    # A numbered citation follows its passage to its new place (a dropped passage may have come before it).
    answer, new_answer = example.answer, recited(example, shown, cfg)
    # A ChatML text row carries both: the turns parsed from the text (what is encoded) and the text itself.
    text = example.text
    if text is not None:
        text = _swap_answer(text.replace(current, turn, 1), answer, new_answer)
    messages = None if example.messages is None else [dict(m) for m in example.messages]
    if messages is not None:
        last_user(messages)["content"] = turn
        if new_answer != answer:
            last_assistant(messages)["content"] = new_answer
    return dataclasses.replace(example, messages=messages, text=text, meta=meta)


def _swap_answer(text: str, old: str, new: str) -> str:
    """A ChatML text row with its (last) answer replaced."""
    if old == new:
        return text
    head, sep, tail = text.rpartition(old)
    return head + new + tail if sep else text


def prompt_length(tokenizer):
    """A row's tokens other than its answer's (system prompt, question, passages, chat markup): what a grounded
    prompt is fitted by, the same for a training row and for a question at inference (whose answer is empty)."""

    def length(example) -> int:
        encoded = encode_example(tokenizer, example, 10**9)
        return encoded.full_length - encoded.supervised

    return length


def prompt_budget(encoded: list, max_length: int) -> int:
    """data.prompt_tokens for rows of at most max_length tokens (`encoded`: the rows encoded uncut): max_length less
    their longest answer, so that any answer fits after any prompt that fits."""
    return max(1, max_length - max((x.supervised for x in encoded), default=0))


def auto_max_length(tokenizer, examples: list, encoded: list, kb_texts: dict[str, str], cfg: DataConfig) -> int:
    """train.max_length when it is null (`encoded`: the examples encoded uncut). Closed-book rows: the longest row
    (nothing is cut). Grounded rows: room for the longest answer after the longest prompt that shows one passage —
    the KB's longest text — whole, and no less than AUTO_MAX_LENGTH: on a KB of long texts a prompt then shows its
    top passage whole and fewer or shortened others, instead of rows with no room left for their answer."""
    if not any(e.grounded for e in examples):
        return max((x.full_length for x in encoded), default=AUTO_MAX_LENGTH)
    longest_answer = max(x.supervised for x in encoded)
    rebuilt = [(e, _current_turn(e, kb_texts, cfg)) for e in examples]
    rebuilt = [(e, current) for e, current in rebuilt if current is not None]
    if not rebuilt or not kb_texts:  # prompts that cannot be refitted: room for the longest row as it is
        return max(AUTO_MAX_LENGTH, max(x.full_length for x in encoded))
    widest = max(kb_texts.items(), key=lambda item: len(tokenizer.encode_plain(item[1])))
    length = prompt_length(tokenizer)
    one_passage = max(length(_showing(e, current, [widest], cfg)) for e, current in rebuilt)
    return max(AUTO_MAX_LENGTH, longest_answer + one_passage)


def with_lengths(cfg: Config, tokenizer, examples: list) -> Config:
    """cfg with what training fits these train and valid rows to and keeps with the run: train.max_length when it
    is null (auto_max_length) and, for grounded rows, data.prompt_tokens when it is null (prompt_budget)."""
    max_length, data = cfg.train.max_length, cfg.data
    grounded = any(e.grounded for e in examples)
    if max_length is None or (data.prompt_tokens is None and grounded):
        encoded = [encode_example(tokenizer, e, 10**9) for e in examples]  # once, for both lengths
        if max_length is None:
            max_length = auto_max_length(tokenizer, examples, encoded, _kb_texts(data), data)
        if data.prompt_tokens is None and grounded:
            data = dataclasses.replace(data, prompt_tokens=prompt_budget(encoded, max_length))
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, max_length=max_length), data=data)


def _kb_texts(cfg: DataConfig) -> dict[str, str]:
    """data.kb's texts by doc id; empty when it cannot be read (grounded rows are then used as they are)."""
    from mlx_lora.core.errors import UserError
    from mlx_lora.data.kb import load_kb

    try:
        return {doc_id: doc.text for doc_id, doc in load_kb(cfg.kb).items()}
    except (UserError, OSError):
        return {}


def fitted_turn(question: str, passages, cfg: DataConfig, length=None, system_prompt: str | None = None):
    """(the grounded user turn for a question at inference, the doc ids it shows): its retrieved passages, fewer
    or shortened as fit_passages() does for a training row when cfg.prompt_tokens (the run's) is set; `length` is
    prompt_length(tokenizer). Without either, all passages whole."""
    turn, ids = user_turn(question, passages, cfg), [doc_id for doc_id, _ in passages]
    if cfg.prompt_tokens is None or length is None:
        return turn, ids
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    messages += [{"role": "user", "content": turn}, {"role": "assistant", "content": ""}]
    example = Example(messages, meta={"question": question, "passages": ids, "doc_id": None})
    fitted, _ = fit_passages(example, dict(passages), cfg, length, cfg.prompt_tokens)
    return last_user(fitted.messages)["content"], list(fitted.meta["passages"])


def fit_rows(examples: list, length, cfg: DataConfig, path, max_length: int) -> tuple[list, list[str]]:
    """fit_passages() for every grounded row of a file, against today's KB (data.kb): each prompt (`length(row)`
    counts it: prompt_length) to cfg.prompt_tokens, which training set from max_length. Returns (rows, warnings).
    Without grounded rows, a budget or a readable KB, rows are returned as they are (the usual cut applies)."""
    from mlx_lora.core.errors import UserError

    if not any(e.grounded for e in examples) or cfg.prompt_tokens is None:
        return examples, []
    for example in examples:  # an adapter must be told to read citations the way its rows wrote them
        cite = example.meta.get("cite", "doc_id")  # rows built before data.cite existed cite doc ids
        if example.grounded and cite != cfg.cite:
            raise UserError(
                f"{path}:{example.line}: this row was built with data.cite={cite} but the config says "
                f"data.cite={cfg.cite}: set data.cite: {cite}, or rebuild the data with `mlx-lora data build`"
            )
    kb_texts = _kb_texts(cfg)
    if not kb_texts:
        return examples, []

    out, shortened = [], 0
    for example in examples:
        row, what = fit_passages(example, kb_texts, cfg, length, cfg.prompt_tokens)
        out.append(row)
        shortened += what == "shortened"
    if not shortened:
        return out, []
    return out, [
        f"warning: {path}: {shortened} of {len(examples)} grounded prompts are longer than data.prompt_tokens="
        f"{cfg.prompt_tokens} (train.max_length={max_length} less the longest answer) with all their passages: "
        "they show fewer passages or a shortened one, in training and at inference alike (never a shorter "
        "answer); raise train.max_length to show them whole"
    ]


def fit_prompts(examples: list, kb_texts: dict[str, str], cfg: DataConfig, length) -> list:
    """Rows to answer (eval's, after grounded.reground) fitted to the run's cfg.prompt_tokens as a served question's
    prompt is (fitted_turn): blind to the row's gold doc, so passages go by rank alone — fitted knowing it, the
    gold passage outlived a higher-ranked one in 7 of kb2's 196 held answerable questions, a view no user gets.
    Unchanged without a budget (a run from before it, or closed-book)."""
    if cfg.prompt_tokens is None:
        return examples
    return [fit_passages(e, kb_texts, cfg, length, cfg.prompt_tokens, keep_gold=False)[0] for e in examples]


def data_length_warnings(data_dir, tokenizer: ChatTokenizer, cfg: Config) -> list[str]:
    """length_warnings() for the train and valid files of a data folder: what training will read (grounded rows
    fitted first, to the lengths training sets: with_lengths)."""
    read = {}
    for name in ("train.jsonl", "valid.jsonl"):
        if (Path(data_dir) / name).is_file():
            read[Path(data_dir) / name] = read_examples(Path(data_dir) / name)
    cfg = with_lengths(cfg, tokenizer, [e for rows in read.values() for e in rows])
    max_length, warnings = cfg.train.max_length, []
    for path, examples in read.items():
        examples, notes = fit_rows(examples, prompt_length(tokenizer), cfg.data, path, max_length)
        warnings += notes
        warnings += length_warnings(path, encode_rows(tokenizer, examples, max_length), max_length)
    return warnings
