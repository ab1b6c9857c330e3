"""Config loading: defaults, YAML, overrides, and one-line errors for unknown keys and wrong types."""

import pytest

from mlx_lora.core.config import Config
from mlx_lora.core.config_file import load_config
from mlx_lora.core.errors import UserError


def test_defaults_match_the_reference_hyper_parameters():
    cfg = Config()
    assert (cfg.lora.rank, cfg.lora.alpha, cfg.lora.dropout) == (16, 32.0, 0.05)
    assert (cfg.train.lr, cfg.train.batch_size, cfg.train.grad_accum, cfg.train.epochs) == (3e-4, 4, 2, 3)


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  lr: 3e-4\n  epochs: 5\nlora:\n  targets: [q_proj, v_proj]\n")
    cfg = load_config(path, ["train.epochs=2", "lora.rank=8", "backend.name=torch"])
    assert cfg.train.lr == pytest.approx(3e-4) and isinstance(cfg.train.lr, float)  # YAML 1.1 reads 3e-4 as a string
    assert cfg.train.epochs == 2 and cfg.lora.rank == 8 and cfg.backend.name == "torch"
    assert cfg.lora.targets == ["q_proj", "v_proj"]


def test_override_parses_floats_lists_and_null():
    cfg = load_config(None, ["train.lr=1e-5", "lora.targets=q_proj,k_proj", "train.max_steps=null"])
    assert cfg.train.lr == 1e-5 and cfg.lora.targets == ["q_proj", "k_proj"] and cfg.train.max_steps is None


@pytest.mark.parametrize(
    "text, needle",
    [
        ("train:\n  lrr: 1\n", "unknown config key train.lrr"),
        ("trian:\n  lr: 1\n", "unknown config section 'trian'"),
        ("train:\n  epochs: three\n", "train.epochs: expected int"),
        ("lora:\n  dora: maybe\n", "lora.dora: expected bool"),
        ("train: [1, 2]\n", "section train must be a mapping"),
        ("lora:\n  targets: [1, 2]\n", "lora.targets: expected a list of names"),
        ("train:\n  lr: [1\n", "c.yaml:"),
    ],
)
def test_errors_are_one_line_and_name_the_key(tmp_path, text, needle):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(UserError) as info:
        load_config(path)
    message = str(info.value)
    assert needle in message and "\n" not in message


def test_unknown_key_lists_the_valid_ones():
    with pytest.raises(UserError, match="valid keys in train: epochs, max_steps"):
        load_config(None, ["train.nope=1"])


def test_bad_override_syntax():
    with pytest.raises(UserError, match="section.key=value"):
        load_config(None, ["lr=1"])


def test_reference_config_loads_and_equals_defaults():
    from conftest import REPO

    cfg = load_config(REPO / "configs" / "reference.yaml")
    assert cfg == Config()


@pytest.mark.parametrize(
    "override, needle",
    [
        ("train.schedule=foo", "train.schedule: 'foo' is not one of cosine, linear, constant"),
        ("data.format=xml", "data.format: 'xml' is not one of messages, text"),
        ("train.lr=-1", "train.lr: -1.0 must be > 0"),
        ("train.lr=.nan", "train.lr: nan must be > 0"),
        ("lora.dropout=1", "lora.dropout: 1.0 must be in [0, 1)"),
        ("train.max_steps=0", "train.max_steps: 0 must be ≥ 1"),
        ("generate.top_p=0", "generate.top_p: 0.0 must be in (0, 1]"),
        ("data.test_fraction=-0.5", "data.test_fraction: -0.5 must be in [0, 1)"),
        ("eval.threshold=bogus", "eval.threshold: threshold 'bogus'"),
        ("data.valid_fraction=0.8", "must add up to less than 1"),  # with the default test_fraction 0.2
    ],
)
def test_values_out_of_range_stop_before_any_work(override, needle):
    with pytest.raises(UserError) as info:
        load_config(None, [override])
    assert needle in str(info.value) and "\n" not in str(info.value)


def test_a_wrong_type_in_a_file_names_the_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  epochs: three\n")
    with pytest.raises(UserError, match=f"^{path}: config key train.epochs: expected int"):
        load_config(path)


def test_a_key_given_twice_is_an_error_not_a_silent_overwrite(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  seed: 7\ntrain:\n  epochs: 1\ndata:\n  seed: 8\n")
    with pytest.raises(UserError, match=rf"^{path}:5: duplicate key 'data' \(first at line 1\)"):
        load_config(path)


def test_non_utf8_bytes_name_the_line_and_a_bom_is_accepted(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_bytes("train:\n  epochs: 2\n  # caf\xe9\n".encode("latin-1"))
    with pytest.raises(UserError, match=rf"^{path}:3: not UTF-8 \(byte 0xe9\)"):
        load_config(path)
    path.write_bytes(b"\xef\xbb\xbftrain:\n  epochs: 2\n")
    assert load_config(path).train.epochs == 2
