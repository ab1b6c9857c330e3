"""What a backend implements: a Backend (load, engine, generate, fuse) and an Engine (one training step)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from mlx_lora.core.config import Config, GenerateConfig
from mlx_lora.data.render import Encoded


@dataclass(frozen=True)
class StepResult:
    """One optimizer step on an accumulation group; `applied` is False when its loss or grad-norm was not finite
    and the engine left weights and optimizer state as they were before it."""

    loss: float  # mean over the group's supervised tokens (on all ranks)
    grad_norm: float  # before clipping
    tokens: int
    supervised_tokens: int
    applied: bool = True


@dataclass(frozen=True)
class ValidResult:
    """One pass over the valid rows: the loss, and per row (in the order given) the margin of a decision token as
    the answer's first token — its logit minus the highest other one, as greedy decoding weighs it — when asked."""

    loss: float  # token-weighted mean over every supervised token (all ranks together)
    margins: list[float] | None = None  # None unless a token was given and this process saw every row


class Engine(Protocol):
    """A backend's training step and state; the shared loop (mlx_lora.training.loop) owns all policy."""

    name: str  # the backend's name, written into checkpoints
    device: str
    rank: int  # this process under data parallelism (0 otherwise)
    world: int
    precision: str  # the arithmetic training uses: "fp32" or "bf16" (frozen weights)
    warnings: list[str]  # notes from loading, reported once when training starts

    def param_counts(self) -> tuple[int, int]:
        """(trainable, total) parameters."""

    def step(self, group: list[list[Encoded]], lr: float, step: int) -> StepResult:
        """Forward/backward each micro-batch of the group, clip, apply AdamW at lr; `step` seeds dropout."""

    def validate(self, rows: list[Encoded], token: int | None = None) -> ValidResult:
        """The valid loss; with `token`, also each row's first-answer-token margin for it, from the same forward
        pass (the refusal bias is calibrated on them without a second pass over valid)."""

    def save_adapter(self, folder: Path) -> None:
        """Write the adapter in the backend's native format into the new folder `folder`."""

    def load_adapter(self, folder: Path) -> None:
        """Replace the adapter weights with a saved adapter's (the run's best, at the end)."""

    def save_state(self, folder: Path) -> None:
        """Write optimizer moments and RNG state files into a checkpoint folder being built."""

    def restore_state(self, folder: Path) -> None:
        """Adapter weights, optimizer moments and RNG from a checkpoint folder; a layout mismatch is a UserError."""

    def memory_mb(self) -> float:
        """Peak memory so far."""

    def agree(self, flag: bool) -> bool:
        """True when `flag` is set on any rank (so all ranks stop at the same step)."""

    def barrier(self) -> None:
        """Wait for every rank (after rank 0 wrote files)."""

    def report(self) -> dict:
        """Figures of the run for its summary (MLX: compile_traces); {} when the engine has none."""

    def close(self) -> None:
        """Release process groups and the like."""


class Backend(Protocol):
    name: str

    def available(self) -> tuple[bool, str]:
        """(usable here?, one line why or why not) — must not import the heavy library when it is absent."""

    def load(self, model_dir: Path, adapter: Path | None, cfg: Config) -> Any:
        """Load the base model (and an adapter of either format) for training or generation."""

    def engine(self, loaded: Any, cfg: Config) -> Engine:
        """Attach LoRA layers (or unfreeze a loaded adapter's) and build the optimizer: a ready Engine."""

    def generate(
        self,
        loaded: Any,
        prompts: list[list[int]],
        cfg: GenerateConfig,
        stop_ids: list[int],
        on_token: Callable[[int, int], None] | None = None,
        biased: list[bool] | None = None,
    ) -> list[list[int]]:
        """New token ids for each prompt (batched); on_token(prompt_index, token_id) streams them. The loaded
        model's first_token_bias (token id → logit bias) is added to the first new token's logits of each prompt
        flagged in `biased` (None: every prompt; grounded.familiar decides)."""

    def token_margins(self, loaded: Any, prompts: list[list[int]], cfg: GenerateConfig, token: int) -> list[float]:
        """Per prompt, the logit of `token` as its first new token minus the highest other logit (> 0: greedy
        decoding starts with it), no first-token bias applied; in the precision generate() uses."""

    def fuse(self, loaded: Any, out_dir: Path) -> Path:
        """Merge the loaded adapter into the base weights and save an HF folder."""
