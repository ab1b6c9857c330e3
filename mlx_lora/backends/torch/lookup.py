"""Greedy decoding with prompt-lookup drafts: a grounded answer copies its passage, so the prompt predicts it.

Each step, every row proposes the tokens that followed the latest earlier occurrence of its last few tokens
(in its prompt or its answer so far, else in an answer written before: AnswerMemory) and the model checks them all
in one forward pass: the longest prefix that greedy decoding would also have chosen is kept, plus the model's own
next token. The output is greedy decoding's (to float rounding: a pass over several tokens sums in another order
than one over one); a step costs one pass whether it keeps one token or eleven.

Rows keep one KV cache of the same length: a rejected draft token stays in it, masked out (attention mask 0), and
each row's positions count only the tokens it kept, so the model sees exactly the sequence greedy decoding built.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from mlx_lora.backends.torch.cache import biased, cache_kwarg, left_padded, returned_cache

MAX_NGRAM = 3  # the longest tail searched for; shorter tails are tried when it does not occur
# A one-token match drafts mostly junk in free text: on a base model's answers (8 rows, adaptive drafts) decoding
# ran 0.86x plain greedy with 1-token matches allowed, 0.91x without; grounded answers lost nothing by it.
MIN_NGRAM = 2
# Tokens one verification pass may cover, all rows together: a draft costs compute even when it is rejected, and
# on a 2-core CPU (0.5B, bf16, grounded valid prompts, 51-token answers) one row checked 8 drafted tokens best
# (6.0 s plain -> 2.0 s; 4: 2.3 s, 16: 2.5 s) and 8 rows 4 each (14.7 s -> 9.6 s; 8: 11.4 s, 16: 12.8 s). So each
# step drafts up to budget / rows - 1 tokens per row; from 40 rows on there is nothing to draft (the plain loop).
STEP_BUDGET = 40
# Answers kept as draft sources for later ones. A refusal quotes no prompt, so without them a row that refuses
# takes one pass per token and is the batch's slowest row; the same sentence recurs in every refusal.
MEMORY = 32


def draft_size(rows: int, most: int) -> int:
    """Tokens each of `rows` rows may draft this step: at most `most`, within STEP_BUDGET for the pass."""
    return max(0, min(most, STEP_BUDGET // max(1, rows) - 1))


def draft(
    context: list[int], size: int, max_ngram: int = MAX_NGRAM, min_ngram: int = MIN_NGRAM, memory=None
) -> list[int]:
    """Up to `size` tokens that followed the latest earlier occurrence of the context's last n tokens (n from
    max_ngram down to min_ngram), else what followed it in an earlier answer (`memory`, an AnswerMemory); none
    when the tail occurs in neither."""
    for n in range(min(max_ngram, len(context) - 1), min_ngram - 1, -1):
        tail = context[-n:]
        for start in range(len(context) - n - 1, -1, -1):  # latest occurrence first, never the tail itself
            if context[start : start + n] == tail:
                return context[start + n : start + n + size]
        found = memory.follow(tail, size) if memory is not None else []
        if found:
            return found
    return []


class AnswerMemory:
    """The last MEMORY answers a model wrote, indexed by their n-grams (MIN_NGRAM..MAX_NGRAM tokens): a lookup is
    one dict access, so a row whose tail is nowhere pays nothing per remembered answer."""

    def __init__(self, size: int = MEMORY):
        self.answers: deque[list[int]] = deque(maxlen=size)
        self._after: dict[tuple[int, ...], tuple[list[int], int]] = {}

    def add(self, answers: list[list[int]], max_new_tokens: int, stop_id: int | None) -> None:
        """Remember a batch's answers, each once: one that stopped (shorter than the limit) with the stop token
        after it, so a draft can end a row in the pass that checks it."""
        for answer in answers:
            seq = [*answer, stop_id] if stop_id is not None and len(answer) < max_new_tokens else list(answer)
            if len(seq) > MIN_NGRAM and seq not in self.answers:
                self.answers.append(seq)
        self._after = {}
        for seq in self.answers:  # oldest first: a newer answer's occurrence replaces an older one's
            for n in range(MIN_NGRAM, MAX_NGRAM + 1):
                for start in range(len(seq) - n):  # a tail that ends an answer has nothing after it
                    self._after[tuple(seq[start : start + n])] = (seq, start + n)

    def follow(self, tail: list[int], size: int) -> list[int]:
        """Up to `size` tokens that followed `tail` in the newest remembered answer holding it."""
        hit = self._after.get(tuple(tail))
        return hit[0][hit[1] : hit[1] + size] if hit else []


def adapt(size: int, proposed: int, accepted: int, most: int) -> int:
    """A row's next draft size: two more after a draft kept whole, what was kept after a partial one (0 after a
    rejected one). Drafts of rambling text (a base model's) are mostly wrong and each costs a pass's compute: with a
    fixed 4-token draft for 8 rows, decoding ran 0.77x plain greedy on base-model answers."""
    if not proposed:
        return size
    return min(most, proposed + 2) if accepted == proposed else accepted


@dataclass
class _Row:
    """A row still writing."""

    index: int  # its prompt's place in the batch
    token: int  # its next input: the last token it emitted, not yet in the KV cache
    cached: int  # its tokens in the KV cache (its next position)
    size: int  # how many tokens it may draft next (adapt())
    proposed: list[int] = field(default_factory=list)  # its draft for this step


@torch.no_grad()
def generate_batch(
    model,
    prompts: list[list[int]],
    max_new_tokens: int,
    draft_tokens: int,
    stop_ids: list[int],
    pad_id: int,
    device: torch.device,
    on_token: Callable[[int, int], None] | None = None,
    offset: int = 0,
    memory: AnswerMemory | None = None,
    first_bias: dict[int, float] | None = None,
    biased_rows: list[bool] | None = None,
) -> list[list[int]]:
    """Greedy new tokens per prompt (stop token excluded), checking up to `draft_tokens` drafted tokens per row
    a step (fewer while many rows write: draft_size); `memory`: earlier answers to draft from (draft())."""
    ids, attention = left_padded(prompts, pad_id, device)
    width = ids.shape[1]
    cache_name = cache_kwarg(model)
    result = model(
        input_ids=ids,
        attention_mask=attention,
        position_ids=(attention.cumsum(-1) - 1).clamp(min=0),
        use_cache=True,
        # an index, not an int: an int slices a strided view whose lm_head copies the vocabulary per row (generate.py)
        logits_to_keep=torch.tensor([width - 1], device=device),
    )
    cache = returned_cache(result, cache_name)
    first = biased(result.logits[:, -1].float(), first_bias, biased_rows).argmax(dim=-1).tolist()

    stops, out = set(stop_ids), [[] for _ in prompts]
    contexts = [list(p) for p in prompts]  # where each row's drafts are looked up: its prompt and answer so far

    def emit(index: int, tokens: list[int]) -> bool:
        """Append a row's new tokens up to a stop token or the limit; True when the row is finished."""
        for token in tokens:
            if token in stops:
                return True
            out[index].append(token)
            contexts[index].append(token)
            if on_token is not None:
                on_token(offset + index, token)
            if len(out[index]) >= max_new_tokens:
                return True
        return False

    rows = [_Row(i, t, len(p), draft_tokens) for i, (t, p) in enumerate(zip(first, prompts)) if not emit(i, [t])]
    if not rows:  # every row stopped at its first token (or the limit is one token)
        return out
    keep = [row.index for row in rows]

    def redraft() -> None:
        cap = draft_size(len(rows), draft_tokens)
        for row in rows:
            # a row whose last draft missed (size 0) tries again with 2 tokens: the text may quote the prompt again
            row.proposed = draft(contexts[row.index], min(row.size, cap) or min(2, cap), memory=memory)

    redraft()
    if len(keep) < len(prompts):
        cache.batch_select_indices(torch.tensor(keep, device=device))
        attention = attention[keep]
    while rows:
        span = 1 + max(len(row.proposed) for row in rows)  # the input token and the longest draft
        step_ids = torch.tensor(
            [[row.token, *row.proposed, *[pad_id] * (span - 1 - len(row.proposed))] for row in rows], device=device
        )
        step_pos = torch.tensor([[row.cached + j for j in range(span)] for row in rows], device=device)
        real = torch.tensor([[int(j <= len(row.proposed)) for j in range(span)] for row in rows], device=device)
        result = model(
            input_ids=step_ids,
            attention_mask=torch.cat([attention, real.to(attention.dtype)], dim=1),
            position_ids=step_pos,
            use_cache=True,
            logits_to_keep=torch.arange(span, device=device),
            **{cache_name: cache},
        )
        cache = returned_cache(result, cache_name)
        picks = result.logits.float().argmax(dim=-1).tolist()  # the model's choice after each input token
        kept = torch.zeros(len(rows), span, dtype=attention.dtype, device=device)
        still = []
        for k, (row, choice) in enumerate(zip(rows, picks)):
            proposed, accepted = row.proposed, 0
            while accepted < len(proposed) and proposed[accepted] == choice[accepted]:
                accepted += 1
            row.size = adapt(row.size, len(proposed), accepted, draft_tokens)
            kept[k, : accepted + 1] = 1  # the input token and the accepted drafts; the rest stays masked out
            row.cached += accepted + 1
            new = proposed[:accepted] + [choice[accepted]]
            if not emit(row.index, new):
                row.token = new[-1]
                still.append(k)
        attention = torch.cat([attention, kept], dim=1)
        if len(still) < len(rows):
            if not still:
                break
            cache.batch_select_indices(torch.tensor(still, device=device))
            attention = attention[still]
            rows = [rows[k] for k in still]
        redraft()
    return out
