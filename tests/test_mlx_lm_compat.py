"""mlx-lm compatibility: its train/generate flags parse onto our config, and its LoRA YAML maps or is refused."""

import pytest

from mlx_lora.commands.generate import generate
from mlx_lora.commands.train import train, train_config
from mlx_lora.core.config import Config
from mlx_lora.core.config_file import load_config
from mlx_lora.core.errors import UserError
from mlx_lora.core.mlx_lm_config import is_mlx_lm_config

MLX_LM_YAML = """\
model: mlx-community/Qwen2.5-0.5B-Instruct-4bit
train: true
fine_tune_type: lora
optimizer: adamw
data: my_data
seed: 7
num_layers: 8
batch_size: 2
iters: 100
learning_rate: 1e-5
steps_per_eval: 50
grad_accumulation_steps: 3
adapter_path: adapters
max_seq_length: 512
mask_prompt: true
lora_parameters:
  keys: [self_attn.q_proj, self_attn.v_proj, mlp.down_proj]
  rank: 8
  scale: 20.0
  dropout: 0.1
"""


def parsed(command, args: list[str]) -> dict:
    return command.make_context(command.name, args).params


def train_cfg(args: list[str]) -> Config:
    params = parsed(train, args)
    for unused in ("data_dir", "resume", "no_progress", "mask_prompt"):
        params.pop(unused)
    return train_config(**params)


def test_mlx_lm_train_flags_set_our_keys():
    cfg = train_cfg(
        ["--iters", "7", "--batch-size", "2", "--num-layers", "4", "--learning-rate", "1e-4", "--adapter-path", "a"]
        + ["--rank", "8", "--mask-prompt"]
    )
    assert (cfg.train.max_steps, cfg.train.batch_size, cfg.lora.num_layers, cfg.train.lr) == (7, 2, 4, 1e-4)
    assert (cfg.train.out, cfg.lora.rank) == ("a", 8)
    # Our own names are the same options; -1 layers is mlx-lm's "all", our null.
    cfg = train_cfg(["--max-steps", "5", "--lr", "2e-4", "--out", "b", "--num-layers", "-1"])
    assert (cfg.train.max_steps, cfg.train.lr, cfg.train.out, cfg.lora.num_layers) == (5, 2e-4, "b", None)
    assert train_cfg([]).train == Config().train  # an option not given leaves the config alone


def test_mlx_lm_generate_flags_are_aliases():
    with_aliases = parsed(generate, ["--max-tokens", "9", "--temp", "0.5", "q"])
    ours = parsed(generate, ["--max-new-tokens", "9", "--temperature", "0.5", "q"])
    assert with_aliases == ours and ours["max_new_tokens"] == 9 and ours["temperature"] == 0.5


def test_help_names_the_aliases_and_explains_every_step_option():
    train_help = train.get_help(train.make_context("train", []))
    assert "on DATA" not in train_help
    for flag in ("--iters", "--batch-size", "--num-layers", "--learning-rate", "--adapter-path", "--lr", "--rank"):
        assert flag in train_help
    assert "Passes over the train split" in train_help and "Stop after N optimizer steps" in train_help
    generate_help = generate.get_help(generate.make_context("generate", ["q"]))
    for flag in ("--adapter-path", "--max-tokens", "--temp", "Nucleus sampling"):
        assert flag in generate_help


def test_an_mlx_lm_config_maps_onto_ours(tmp_path):
    path = tmp_path / "lora_config.yaml"
    path.write_text(MLX_LM_YAML, encoding="utf-8")
    cfg = load_config(path)
    assert cfg.model.path == "mlx-community/Qwen2.5-0.5B-Instruct-4bit" and cfg.data.dir == "my_data"
    assert (cfg.train.max_steps, cfg.train.batch_size, cfg.train.lr, cfg.train.out) == (100, 2, 1e-5, "adapters")
    assert (cfg.train.max_length, cfg.train.eval_every, cfg.train.grad_accum, cfg.train.seed) == (512, 50, 3, 7)
    assert (cfg.lora.rank, cfg.lora.alpha, cfg.lora.dropout, cfg.lora.num_layers) == (8, 160.0, 0.1, 8)
    assert cfg.lora.targets == ["q_proj", "v_proj", "down_proj"] and cfg.lora.dora is False
    # Command-line flags still win over the file.
    assert train_cfg(["-c", str(path), "--iters", "3"]).train.max_steps == 3


def test_our_own_config_is_not_taken_for_mlx_lm():
    assert not is_mlx_lm_config({"train": {"lr": 1e-4}, "model": {"path": "x"}})
    assert not is_mlx_lm_config({"train": [1, 2]})  # ours, malformed: the error names our section
    assert is_mlx_lm_config({"model": "x", "iters": 3}) and is_mlx_lm_config({"model": "x"})


@pytest.mark.parametrize(
    "text, needle",
    [
        ("iters: 3\nval_batches: 25\n", "mlx-lm key val_batches: not supported"),
        ("iters: 3\nlr_schedule: {name: cosine_decay}\n", "mlx-lm key lr_schedule: not supported"),
        ("iters: 3\nwhatever: 1\n", "mlx-lm key whatever: unknown key"),
        ("fine_tune_type: full\n", "mlx-lm key fine_tune_type: 'full' is not supported"),
        ("iters: 3\nlora_parameters: {rank: 8, alpha: 16}\n", "mlx-lm key lora_parameters.alpha: not supported"),
        ("iters: 0\n", "train.max_steps"),
        ("batch_size: many\n", "mlx-lm key batch_size"),
    ],
)
def test_unsupported_mlx_lm_keys_are_one_line_errors(tmp_path, text, needle):
    path = tmp_path / "lora_config.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(UserError) as info:
        load_config(path)
    message = str(info.value)
    assert needle in message and "\n" not in message
    if "not supported" in needle or "unknown" in needle:
        assert "supported mlx-lm keys: model, data, iters" in message
