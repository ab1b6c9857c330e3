"""Seeded length-grouped batches and optimizer-step accounting: both backends see the same data in the same order."""

from __future__ import annotations

import math
import random

from mlx_lora.data.render import Encoded


def epoch_batches(rows: list[Encoded], batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Row indices per batch for one epoch.

    Rows are shuffled, cut into windows of 50 batches, sorted by length inside each window (so a batch pads
    little), then the batches themselves are shuffled: the order is random yet padding stays small.
    """
    rng = random.Random(seed * 1_000_003 + epoch)
    order = list(range(len(rows)))
    rng.shuffle(order)
    window = batch_size * 50
    batches = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start : start + window], key=lambda i: len(rows[i].ids))
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


# Valid rows are only read (no gradients kept), so a valid pass takes more rows a batch than training may: a wider
# matmul runs nearer the CPU's peak. The main job's 64 valid rows on the 0.5B, fp32, 2-core AVX2 CPU, alternated:
# 128 s at 2 rows a batch, 102 s at 8 (1.24-1.28x), the same loss. Sorted by length, they pad little. The logits of
# every supervised position are held at once (152k words x 4 bytes each on the embedded model): VALID_SUPERVISED
# caps them near what a training step holds (~0.6 GB).
VALID_BATCH, VALID_SUPERVISED = 8, 1024


def valid_batches(rows: list[Encoded], batch_size: int) -> list[list[int]]:
    """Row indices per batch of a valid pass: shortest first, up to VALID_BATCH rows (or train's batch, if larger)
    and VALID_SUPERVISED supervised tokens a batch — never fewer rows than train's batch."""
    most = max(batch_size, VALID_BATCH)
    batches: list[list[int]] = []
    held = 0  # supervised tokens of the batch being filled
    for i in sorted(range(len(rows)), key=lambda i: len(rows[i].ids)):
        n = len(batches[-1]) if batches else most
        if n >= most or (n >= batch_size and held + rows[i].supervised > VALID_SUPERVISED):
            batches.append([])
            held = 0
        batches[-1].append(i)
        held += rows[i].supervised
    return batches


def rank_share(batches: list, rank: int, world: int) -> list:
    """One data-parallel rank's share of an epoch's batches. Every rank gets the same count (so collectives line
    up): when the batches do not divide evenly, the short ranks wrap around to the epoch's first batches."""
    if world <= 1:
        return batches
    per_rank = math.ceil(len(batches) / world)
    return [batches[(rank + k * world) % len(batches)] for k in range(per_rank)]


def steps_per_epoch(n_rows: int, batch_size: int, grad_accum: int, world: int = 1) -> int:
    """Optimizer steps in one epoch (each rank's share, see rank_share); a last partial group still makes a step."""
    return math.ceil(math.ceil(math.ceil(n_rows / batch_size) / world) / grad_accum)


def total_steps(
    n_rows: int, batch_size: int, grad_accum: int, epochs: int, max_steps: int | None, world: int = 1
) -> int:
    steps = steps_per_epoch(n_rows, batch_size, grad_accum, world) * epochs
    return min(steps, max_steps) if max_steps else steps


def loss_weights(mask: list[int], first: float, lead: int = 1) -> list[float]:
    """Per-token loss weights: 0 off the answers, `first` on each answer's first `lead` tokens, 1 on the rest."""
    weights, run = [], 0  # run: how many answer tokens in a row end here
    for m in mask:
        run = run + 1 if m else 0
        weights.append(float(m and (first if run <= lead else 1.0)))
    return weights


# train.first_token_weight null: the weight that gives the answers' first tokens this share of the training loss.
# 5, chosen on the sample's valid split, gives it that share there (answers of 43.8 tokens on average, the first
# token weighed as 5 of 47.8). A fixed 5 is a smaller share where answers are longer: on a KB of long texts
# (benchmarks/kb3, 131.6 tokens on average: 3.6%) the adapter refused a third of the answerable questions.
DECISION_SHARE = 0.1045


def decision_weight(rows: list[Encoded], lead: int = 1) -> float:
    """The first_token_weight that gives each answer's first `lead` tokens DECISION_SHARE of these rows' loss
    weight, to a tenth; never under 1 (a plain mean)."""
    rest = weight_sum(rows, 0.0, lead)  # the answer tokens after each answer's first `lead`
    leading = weight_sum(rows, 1.0, lead) - rest
    if not leading:
        return 1.0
    return max(1.0, round(DECISION_SHARE / (1 - DECISION_SHARE) * rest / leading, 1))


def weight_sum(rows: list[Encoded], first: float, lead: int = 1) -> float:
    """What a group's loss is divided by: its supervised tokens, each answer's first `lead` counted `first` times."""
    return sum(sum(loss_weights(r.mask, first, lead)) for r in rows)


def pad_batch(rows: list[Encoded], pad_id: int) -> tuple[list[list[int]], list[list[int]], list[list[int]]]:
    """(ids, mask, attention) padded on the right to the batch's own longest row."""
    width = max(len(r.ids) for r in rows)
    ids = [r.ids + [pad_id] * (width - len(r.ids)) for r in rows]
    mask = [r.mask + [0] * (width - len(r.mask)) for r in rows]
    attention = [[1] * len(r.ids) + [0] * (width - len(r.ids)) for r in rows]
    return ids, mask, attention
