"""MLX ⇄ PyTorch parity on one tiny random Qwen2 with the same LoRA start, and MLX ⇄ PEFT adapter conversion."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import build_tiny_model
from mlx_adapter import write_mlx_adapter

from mlx_lora.backends.adapters import convert, detect_format, info, mlx_to_peft, peft_to_mlx, read_safetensors
from mlx_lora.core.config import Config
from mlx_lora.core.errors import UserError

N_STEPS = 8
# After 8 AdamW steps the float32 rounding of the two frameworks has compounded: measured max gap 9.5e-7 on
# this model; allowed 1e-4. (mlx's default bias_correction=False alone makes the gap 0.058.)
STEP_TOLERANCE = 1e-4


# -- conversion alone: numpy + safetensors, no framework ---------------------------------------------------------


def test_mlx_to_peft_transposes_renames_and_translates_scale(tmp_path):
    src = write_mlx_adapter(tmp_path / "mlx")
    result = mlx_to_peft(tmp_path / "mlx", tmp_path / "peft")
    assert detect_format(tmp_path / "peft") == "peft" and result.format == "peft"
    peft = read_safetensors(tmp_path / "peft" / "adapter_model.safetensors")
    a = peft["base_model.model.model.layers.1.self_attn.v_proj.lora_A.weight"]
    b = peft["base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"]
    assert a.shape == (4, 64) and b.shape == (32, 4)
    assert np.array_equal(a, src["model.layers.1.self_attn.v_proj.lora_a"].T)
    assert np.array_equal(b, src["model.layers.1.self_attn.v_proj.lora_b"].T)
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == pytest.approx(10.0)  # alpha = scale · r
    assert config["target_modules"] == ["q_proj", "v_proj"] and config["layers_to_transform"] == [1, 2]
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"


def test_round_trip_is_exact_and_num_layers_covers_the_adapted_layers(tmp_path):
    src = write_mlx_adapter(tmp_path / "mlx", layers=(1, 3))
    mlx_to_peft(tmp_path / "mlx", tmp_path / "peft")
    back = peft_to_mlx(tmp_path / "peft", tmp_path / "back")
    assert back.num_layers == 3  # layers 1..3 (mlx-lm counts from the end; the unadapted layer 2 stays zero)
    again = read_safetensors(tmp_path / "back" / "adapters.safetensors")
    assert set(again) == set(src) and all(np.array_equal(again[k], src[k]) for k in src)
    config = json.loads((tmp_path / "back" / "adapter_config.json").read_text())
    assert config["lora_parameters"]["scale"] == pytest.approx(2.5)
    assert peft_to_mlx(tmp_path / "peft", tmp_path / "five", num_layers=5).num_layers == 5


def test_rslora_and_bad_input(tmp_path):
    write_mlx_adapter(tmp_path / "mlx")
    mlx_to_peft(tmp_path / "mlx", tmp_path / "peft")
    config_file = tmp_path / "peft" / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**config, "use_rslora": True, "lora_alpha": 8.0}))
    assert info(tmp_path / "peft").scale == pytest.approx(8.0 / 2.0)  # rsLoRA: alpha / sqrt(r)
    config_file.write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(UserError, match="DoRA"):
        peft_to_mlx(tmp_path / "peft", tmp_path / "x")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="neither"):
        detect_format(tmp_path / "empty")
    with pytest.raises(UserError, match="must differ"):
        convert(tmp_path / "mlx", tmp_path / "mlx", "peft")
    (tmp_path / "precious").mkdir()
    (tmp_path / "precious" / "notes.txt").write_text("keep me")
    with pytest.raises(UserError, match="not an adapter folder"):
        convert(tmp_path / "mlx", tmp_path / "precious", "peft")
    assert (tmp_path / "precious" / "notes.txt").read_text() == "keep me"
    config_file.write_text("{not json")
    with pytest.raises(UserError, match="adapter_config.json:1"):
        info(tmp_path / "peft")
    # Corrupt weights: a random header length must not allocate gigabytes; a truncated file must not reshape.
    weights = tmp_path / "mlx" / "adapters.safetensors"
    good = weights.read_bytes()
    for damaged in (bytes(range(256)) * 20, good[: len(good) // 2]):
        weights.write_bytes(damaged)
        with pytest.raises(UserError, match="not a readable safetensors file"):
            read_safetensors(weights)


def test_adapter_cli_convert_and_info(tmp_path):
    from mlx_lora.cli import cli

    write_mlx_adapter(tmp_path / "mlx")
    runner = CliRunner()
    out = runner.invoke(
        cli, ["adapter", "convert", str(tmp_path / "mlx"), "--to", "peft", "--out", str(tmp_path / "peft")]
    )
    assert out.exit_code == 0, out.output
    assert "mlx → peft" in out.output and detect_format(tmp_path / "peft") == "peft"
    shown = runner.invoke(cli, ["adapter", "info", str(tmp_path / "peft"), "--json"])
    described = json.loads(shown.output)
    assert described["format"] == "peft" and described["layers"] == [1, 2] and described["rank"] == 4
    assert described["parameters"] == 2 * 4 * ((64 + 64) + (64 + 32))
    same = runner.invoke(
        cli, ["adapter", "convert", str(tmp_path / "mlx"), "--to", "mlx", "--out", str(tmp_path / "z")]
    )
    assert same.exit_code != 0 and "already" in same.output


# -- both frameworks ------------------------------------------------------------------------------------------------

# Only the tests below need the frameworks: the conversion tests above run in a core-only install too.
BOTH = all(importlib.util.find_spec(name) for name in ("torch", "peft", "transformers", "mlx", "mlx_lm"))
needs_both = pytest.mark.skipif(not BOTH, reason="parity needs torch + transformers + peft and mlx + mlx-lm")
if BOTH:
    import mlx.core as mx
    import torch

    torch.set_num_threads(1)  # 2 threads are erratic for small ops on these machines


def save_hf_model(folder: Path, vocab: int, top_level_rope: bool = True) -> Path:
    """A tiny random Qwen2 with non-zero q/k/v biases (as in a trained model); rope_theta nested as transformers 5
    writes it, and lifted to the top level unless asked not to."""
    return build_tiny_model(folder, vocab, layers=3, bias=0.1, top_level_rope=top_level_rope)


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory, rows_and_vocab) -> Path:
    _, vocab, _ = rows_and_vocab
    return save_hf_model(tmp_path_factory.mktemp("hf") / "model", vocab)


def parity_cfg() -> Config:
    cfg = Config()
    cfg.lora.rank, cfg.lora.alpha, cfg.lora.dropout = 4, 8.0, 0.0
    cfg.lora.targets = ["q_proj", "k_proj", "v_proj", "o_proj"]
    cfg.train.batch_size, cfg.train.grad_accum, cfg.train.epochs = 2, 2, 4
    cfg.train.lr, cfg.train.warmup_steps, cfg.train.weight_decay = 5e-3, 2, 0.01
    cfg.train.max_grad_norm, cfg.train.max_steps, cfg.train.seed = 1.0, N_STEPS, 7
    cfg.backend.device = "cpu"
    cfg.train.precision = "fp32"  # parity with MLX, which trains in fp32
    return cfg


@pytest.fixture(scope="module")
def start_adapter(tmp_path_factory, hf_model) -> Path:
    """PEFT's own LoRA init, with lora_B made non-zero (a zero B hides any A/B mix-up at step 1)."""
    from transformers import AutoModelForCausalLM

    from mlx_lora.backends.torch.lora import attach

    cfg = parity_cfg()
    torch.manual_seed(11)
    peft_model = attach(AutoModelForCausalLM.from_pretrained(hf_model, dtype=torch.float32), cfg.lora)
    generator = torch.Generator().manual_seed(12)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    out = tmp_path_factory.mktemp("start") / "adapter"
    peft_model.save_pretrained(out, safe_serialization=True, save_embedding_layers=False)
    return out


def train_both(hf_model, start_adapter, rows, tmp: Path):
    from mlx_lora.backends.mlx import MLXBackend
    from mlx_lora.backends.torch import TorchBackend
    from mlx_lora.training import loop

    results = {}
    for backend in (TorchBackend(), MLXBackend()):
        cfg = parity_cfg()
        events = []
        loaded = backend.load(hf_model, start_adapter, cfg)  # both continue training the same adapter
        loop.train(
            backend,
            loaded,
            rows[:4] + rows[5:],
            rows[4:5],
            cfg,
            tmp / backend.name,
            lambda e, events=events: events.append(e.to_dict()),
        )
        results[backend.name] = (loaded, events, tmp / backend.name)
    return results


@pytest.fixture(scope="module")
def trained(hf_model, start_adapter, rows_and_vocab, tmp_path_factory):
    rows, _, _ = rows_and_vocab
    return train_both(hf_model, start_adapter, rows, tmp_path_factory.mktemp("runs"))


def steps(events, key):
    return [e[key] for e in events if e["type"] == "step"]


@needs_both
def test_first_step_loss_equal(trained):
    torch_losses, mlx_losses = steps(trained["torch"][1], "loss"), steps(trained["mlx"][1], "loss")
    assert abs(torch_losses[0] - mlx_losses[0]) < 1e-4
    assert abs(steps(trained["torch"][1], "grad_norm")[0] - steps(trained["mlx"][1], "grad_norm")[0]) < 1e-4


@needs_both
def test_losses_agree_after_n_steps(trained):
    torch_events, mlx_events = trained["torch"][1], trained["mlx"][1]
    assert len(steps(torch_events, "loss")) == len(steps(mlx_events, "loss")) == N_STEPS
    assert steps(torch_events, "tokens") == steps(mlx_events, "tokens")  # the same batches, in the same order
    assert steps(torch_events, "supervised_tokens") == steps(mlx_events, "supervised_tokens")
    assert steps(torch_events, "lr") == pytest.approx(steps(mlx_events, "lr"), rel=1e-12)
    assert steps(mlx_events, "loss") == pytest.approx(steps(torch_events, "loss"), abs=STEP_TOLERANCE)
    assert steps(mlx_events, "loss")[-1] < steps(mlx_events, "loss")[0]  # it did learn something
    torch_evals = [e["eval_loss"] for e in torch_events if e["type"] == "eval"]
    mlx_evals = [e["eval_loss"] for e in mlx_events if e["type"] == "eval"]
    assert mlx_evals == pytest.approx(torch_evals, abs=STEP_TOLERANCE)


def torch_logits(hf_model, adapter_dir: Path, ids: list[int]) -> np.ndarray:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(hf_model, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(adapter_dir)).eval()  # plain PEFT, no help from us
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


def mlx_logits(hf_model, adapter_dir: Path, ids: list[int]) -> np.ndarray:
    from mlx_lm import load as mlx_lm_load

    model, _ = mlx_lm_load(str(hf_model), adapter_path=str(adapter_dir))  # plain mlx-lm, no help from us
    return np.array(model(mx.array([ids]))[0])


@needs_both
def test_converted_adapters_give_equal_logits_both_ways(trained, hf_model, rows_and_vocab, tmp_path):
    rows, _, _ = rows_and_vocab
    ids = rows[2].ids
    torch_dir, mlx_dir = trained["torch"][2] / "adapter", trained["mlx"][2] / "adapter"
    assert detect_format(torch_dir) == "peft" and detect_format(mlx_dir) == "mlx"
    # PEFT → MLX: the torch-trained adapter in plain mlx-lm
    convert(torch_dir, tmp_path / "as_mlx", "mlx")
    diff = np.abs(mlx_logits(hf_model, tmp_path / "as_mlx", ids) - torch_logits(hf_model, torch_dir, ids)).max()
    assert diff < 1e-4
    # MLX → PEFT: the mlx-trained adapter in plain PEFT
    convert(mlx_dir, tmp_path / "as_peft", "peft")
    diff = np.abs(torch_logits(hf_model, tmp_path / "as_peft", ids) - mlx_logits(hf_model, mlx_dir, ids)).max()
    assert diff < 1e-4


@needs_both
def test_fusing_a_converted_adapter_through_mlx_lm(trained, hf_model, rows_and_vocab, tmp_path):
    """The torch adapter, converted, fused by mlx-lm's fuse, loads in transformers with PEFT's logits."""
    from transformers import AutoModelForCausalLM

    from mlx_lora.backends.mlx import MLXBackend

    rows, _, _ = rows_and_vocab
    ids = rows[3].ids
    torch_dir = trained["torch"][2] / "adapter"
    convert(torch_dir, tmp_path / "as_mlx", "mlx")
    backend = MLXBackend()
    backend.fuse(backend.load(hf_model, tmp_path / "as_mlx", parity_cfg()), tmp_path / "fused")
    fused = AutoModelForCausalLM.from_pretrained(tmp_path / "fused", dtype=torch.float32).eval()
    with torch.no_grad():
        got = fused(torch.tensor([ids])).logits[0].numpy()
    assert np.abs(got - torch_logits(hf_model, torch_dir, ids)).max() < 1e-4


@needs_both
def test_rope_theta_only_nested_still_matches_torch(rows_and_vocab, tmp_path):
    """transformers 5 writes rope_theta only under rope_parameters; our MLX loader must still match torch."""
    from transformers import AutoModelForCausalLM

    from mlx_lora.backends.mlx.model import load

    rows, vocab, _ = rows_and_vocab
    folder = save_hf_model(tmp_path / "nested", vocab, top_level_rope=False)
    assert "rope_theta" not in json.loads((folder / "config.json").read_text())
    ids = rows[0].ids
    with torch.no_grad():
        expected = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)(torch.tensor([ids])).logits
    got = np.array(load(folder).model(mx.array([ids])))
    assert np.abs(got - expected.numpy()).max() < 1e-4


@needs_both
def test_leading_token_weights_are_the_same_objective_on_both_backends(
    hf_model, start_adapter, rows_and_vocab, tmp_path
):
    from mlx_lora.backends.mlx import MLXBackend
    from mlx_lora.backends.torch import TorchBackend
    from mlx_lora.training import loop

    rows = rows_and_vocab[0]
    first_losses = {}
    settings = ((1.0, 1), (4.0, 1), (4.0, 2))  # (train.first_token_weight, train.first_tokens)
    for weight, lead in settings:
        for backend in (TorchBackend(), MLXBackend()):
            cfg = parity_cfg()
            cfg.train.first_token_weight, cfg.train.first_tokens = weight, lead
            cfg.train.max_steps = 2
            events = []
            loaded = backend.load(hf_model, start_adapter, cfg)
            out = tmp_path / f"{backend.name}-{weight}-{lead}"
            loop.train(backend, loaded, rows[:4] + rows[5:], rows[4:5], cfg, out, lambda e, ev=events: ev.append(e))
            first_losses[backend.name, weight, lead] = [
                e.to_dict()["loss"] for e in events if e.to_dict()["type"] == "step"
            ]
    for setting in settings:
        assert first_losses[("mlx", *setting)] == pytest.approx(first_losses[("torch", *setting)], abs=STEP_TOLERANCE)
    # the weighted mean leans towards the leading tokens' loss, which differs from the others': the loss moves
    assert abs(first_losses["torch", 4.0, 1][0] - first_losses["torch", 1.0, 1][0]) > 1e-3
    assert abs(first_losses["torch", 4.0, 2][0] - first_losses["torch", 4.0, 1][0]) > 1e-3
