"""Loading a model for generation: a run folder (its manifest's settings) or a bare adapter folder, any backend."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from mlx_lora import backends
from mlx_lora.backends import adapters
from mlx_lora.core.config import Config, apply_mapping
from mlx_lora.core.errors import UserError
from mlx_lora.core.model_store import local_model_dir, model_sha256
from mlx_lora.data.render import ChatTokenizer

CALIBRATION = "calibration.json"  # a run's refusal bias (training/refusal_bias.py writes it)
# The data settings that shape a prompt: generation must use the ones the adapter was trained with.
PROMPT_KEYS = ("system_prompt", "mode", "passages", "cite", "passage_template", "grounded_template", "prompt_tokens")
# generate.max_new_tokens: null where no run records its answers' length (a base model, a bare adapter folder).
FALLBACK_NEW_TOKENS = 150
MIN_NEW_TOKENS = 32


def _longest_answer(run: dict | None) -> int | None:
    """The longest answer (tokens) the run was trained or validated on, as its manifest records it."""
    longest = ((run or {}).get("data") or {}).get("longest_answer_tokens")
    return longest if isinstance(longest, int) else None


def answer_budget(setting: int | None, run: dict | None) -> int:
    """The most tokens an answer may take: generate.max_new_tokens when set, else half again the longest answer
    (citation and end token included) the run was trained or validated on — an answer is a KB text shown again,
    and a doc added after training may be longer than any trained one. Greedy answers stop at the end token, so
    the headroom costs only where a model runs on."""
    if setting is not None:
        return setting
    longest = _longest_answer(run)
    return FALLBACK_NEW_TOKENS if longest is None else max(MIN_NEW_TOKENS, longest + longest // 2)


def resolve_answer_budget(cfg: Config, run: dict | None, where: str) -> None:
    """Fix cfg.generate.max_new_tokens for this run (null → answer_budget); warn when a set cap is shorter than
    the answers the run was trained on: they would be cut."""
    longest, setting = _longest_answer(run), cfg.generate.max_new_tokens
    if setting is not None and longest is not None and setting < longest:
        print(
            f"warning: generate.max_new_tokens {setting} is shorter than the longest answer {where} was trained "
            f"on ({longest} tokens): such answers will be cut; set it to null to follow the run",
            file=sys.stderr,
        )
    cfg.generate.max_new_tokens = answer_budget(setting, run)


def saved_prompt_settings(saved_data: dict) -> dict:
    """The prompt settings a run was trained with, from its manifest's data config. A run from before data.cite
    existed cited doc ids."""
    prompt = {k: saved_data[k] for k in PROMPT_KEYS if k in saved_data}
    return {"cite": "doc_id", **prompt} if prompt.get("mode") == "grounded" else prompt


def read_manifest(run_dir: Path) -> dict:
    path = run_dir / "manifest.json"
    try:
        run = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"{path}: unreadable run manifest ({exc}); is {run_dir} a run directory?") from None
    try:  # what generation and evaluation read from it
        run["config"]["lora"], run["config"]["data"]["system_prompt"], run["base_model"]["path"]
    except (KeyError, TypeError) as exc:
        raise UserError(
            f"{path}: not a run manifest (no {exc}); pass a run directory that `mlx-lora train` "
            "wrote, or the adapter folder itself"
        ) from None
    return run


def adapter_location(adapter: str | Path) -> tuple[Path, dict | None]:
    """(adapter folder, the run's manifest or None for a bare adapter folder)."""
    adapter = Path(adapter)
    folder = adapters.adapter_dir(adapter)
    return folder, (read_manifest(adapter) if folder != adapter else None)


def check_base_model(run: dict, model_dir: Path, manifest: Path, cache_dir=None, strict: bool = False) -> None:
    """Warn (one line on stderr), or refuse when strict, if the base model's files are no longer those the run
    was trained on: the adapter would load on different weights without a sign."""
    recorded = (run.get("base_model") or {}).get("sha256")
    if not isinstance(recorded, str):
        return
    actual = model_sha256(model_dir, cache_dir)
    if actual == recorded:
        return
    message = (
        f"{manifest}: base model {model_dir} has changed since training (sha256 {actual[:12]}…, the run recorded "
        f"{recorded[:12]}…); answers may differ from the evaluated ones: use the model the run was trained on"
    )
    if strict:
        raise UserError(f"{message} (refused: --strict)")
    print(f"warning: {message}; --strict refuses", file=sys.stderr)


def load_for_generation(
    model: str | None, adapter: str | Path | None, cfg: Config, progress: bool = True, strict: bool = False
):
    """(backend, loaded, tokenizer, system_prompt): the run's manifest supplies model, LoRA and prompt settings;
    strict refuses a base model whose sha256 differs from the manifest's (else a warning)."""
    system_prompt = cfg.data.system_prompt
    adapter_dir = run = None
    if adapter is not None:
        adapter_dir, run = adapter_location(adapter)
        if run is not None:
            # Generation must render prompts exactly as training did: take the run's settings, not today's defaults.
            saved = run["config"]
            prompt = saved_prompt_settings(saved["data"])
            apply_mapping(cfg, {"lora": saved["lora"], "data": prompt}, str(Path(adapter) / "manifest.json"))
            system_prompt = run.get("system_prompt", system_prompt)
            if model is None:
                model = run["base_model"]["path"]
    resolve_answer_budget(cfg, run, str(adapter))
    if model is not None:
        cfg.model.path = str(model)
    backend = backends.resolve(cfg.backend.name)
    model_dir = local_model_dir(cfg.model.path, cfg.model.cache_dir, progress)
    if run is not None:  # a bare adapter folder records no base model to compare with
        check_base_model(run, model_dir, Path(adapter) / "manifest.json", cfg.model.cache_dir, strict)
    loaded = backend.load(model_dir, adapter_dir, cfg)
    tokenizer = ChatTokenizer.from_dir(model_dir)
    loaded.first_token_bias = first_token_bias(Path(adapter) if run is not None else None, cfg, tokenizer)
    return backend, loaded, tokenizer, system_prompt


def first_token_bias(run_dir: Path | None, cfg: Config, tokenizer: ChatTokenizer | None = None) -> dict[int, float]:
    """{the refusal's first token: its bias} from the run's calibration (training/refusal_bias.py), the bias
    replaced by generate.refusal_bias when that is set; {} without a calibration or at a zero bias. With
    `tokenizer`, the token must still be the one the run recorded (an edited file or another model's tokenizer
    would bias some other token)."""
    path = run_dir / CALIBRATION if run_dir is not None else None
    if path is None or not path.is_file():
        if cfg.generate.refusal_bias:
            print(
                f"warning: generate.refusal_bias {cfg.generate.refusal_bias} ignored: "
                f"{path or 'a bare adapter folder'} has no calibration naming the refusal's first token",
                file=sys.stderr,
            )
        return {}
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
        token, bias = int(saved["token"]), float(saved["refusal_bias"])
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise UserError(f"{path}: unreadable calibration ({exc}); delete it to answer unbiased") from None
    if tokenizer is not None:
        try:
            text = tokenizer.decode([token])
        except Exception:  # an id outside the vocabulary: the tokenizers library raises its own error types
            text = None
        if text != saved.get("token_text"):
            raise UserError(
                f"{path}: token {token} is {text!r} in this model's tokenizer, not the {saved.get('token_text')!r} "
                "the run was calibrated with; delete the file to answer unbiased"
            )
    if cfg.generate.refusal_bias is not None:
        bias = cfg.generate.refusal_bias
    return {token: bias} if bias else {}
