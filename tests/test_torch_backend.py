"""The torch backend on a tiny random Qwen2 with the real Qwen tokenizer: training, masking, PEFT loading, fuse."""

from __future__ import annotations

import json
import shutil

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from torch_helpers import chat_rows, make_cfg, train

from mlx_lora.core.config import Config, LoraConfig
from mlx_lora.data.render import ChatTokenizer, encode_messages

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tok(tiny_qwen2):
    return ChatTokenizer.from_dir(tiny_qwen2)


@pytest.fixture(scope="module")
def trained(tiny_qwen2, tok, tmp_path_factory):
    """One 3-epoch run shared by several tests."""
    run_dir = tmp_path_factory.mktemp("run")
    cfg = make_cfg(epochs=3)
    outcome, events, backend, loaded = train(
        tiny_qwen2, chat_rows(tok, 12), chat_rows(tok, 4, question="VPN 連線"), cfg, run_dir
    )
    return {"run_dir": run_dir, "cfg": cfg, "outcome": outcome, "events": events, "backend": backend, "loaded": loaded}


@pytest.mark.parametrize(
    "lora",
    [
        LoraConfig(rank=4, targets=["q_proj", "k_proj", "v_proj", "o_proj"]),
        LoraConfig(rank=8, targets=["all-linear"], num_layers=1),
        LoraConfig(rank=2, targets=["q_proj", "v_proj"], dora=True),
        LoraConfig(rank=4, targets=["o_proj", "down_proj"], rslora=True, num_layers=2),
    ],
)
def test_trainable_parameter_count_is_exact(tiny_qwen2, lora):
    from transformers import AutoModelForCausalLM

    from mlx_lora.backends.torch.lora import attach

    model = attach(AutoModelForCausalLM.from_pretrained(tiny_qwen2), lora)
    h, kv, inter = 64, 2 * 16, 128  # hidden, kv heads × head_dim, intermediate
    shapes = {
        "q_proj": (h, h),
        "k_proj": (h, kv),
        "v_proj": (h, kv),
        "o_proj": (h, h),
        "gate_proj": (h, inter),
        "up_proj": (h, inter),
        "down_proj": (inter, h),
    }
    targets = list(shapes) if lora.targets == ["all-linear"] else lora.targets
    per_layer = sum(lora.rank * (shapes[t][0] + shapes[t][1]) + (shapes[t][1] if lora.dora else 0) for t in targets)
    expected = per_layer * (lora.num_layers or 2)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == expected
    layers = {int(n.split(".layers.")[1].split(".")[0]) for n, p in model.named_parameters() if p.requires_grad}
    assert layers == set(range(2 - (lora.num_layers or 2), 2))


def test_start_event_counts_trainable_params(trained):
    start = trained["events"][0]
    assert start["trainable_params"] == 2 * 4 * ((64 + 64) * 2 + (64 + 32) * 2)
    assert start["total_params"] > start["trainable_params"]


def _lora_grads(model, ids, mask):
    from mlx_lora.backends.torch.engine import MaskedLMLoss

    model.zero_grad(set_to_none=True)
    MaskedLMLoss(model.get_base_model())(torch.tensor([ids]), torch.tensor([mask])).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_masked_positions_contribute_no_gradient(tiny_qwen2, tok):
    from transformers import AutoModelForCausalLM

    from mlx_lora.backends.torch.lora import attach

    torch.manual_seed(1)
    model = attach(AutoModelForCausalLM.from_pretrained(tiny_qwen2), make_cfg().lora)
    for name, param in model.named_parameters():
        if "lora_B" in name:  # B starts at zero, which would leave every A-gradient zero and the test blind
            torch.nn.init.normal_(param, std=0.5)
    row = chat_rows(tok, 1)[0]
    tail = [1234, 5678, 91011, 1213]  # masked tokens after the answer: neither inputs nor targets may matter
    ids, mask = row.ids + tail, row.mask + [0] * len(tail)
    base = _lora_grads(model, ids, mask)
    changed = _lora_grads(model, row.ids + [4321, 8765, 1011, 1312], mask)
    assert all(torch.equal(base[n], changed[n]) for n in base)
    # The same gradient as the textbook loss: full logits, labels -100 where the mask is 0.
    model.zero_grad(set_to_none=True)
    labels = torch.tensor([[t if m else -100 for t, m in zip(ids, mask)]])
    logits = model(input_ids=torch.tensor([ids])).logits[0, :-1]
    torch.nn.functional.cross_entropy(logits, labels[0, 1:], reduction="sum").backward()
    for name, param in model.named_parameters():
        if param.requires_grad:
            assert torch.allclose(param.grad, base[name], atol=1e-5, rtol=1e-4), name
    # The check can fail: supervising one of the tail tokens changes the gradient.
    unmasked = _lora_grads(model, ids, row.mask + [0, 1, 0, 0])
    assert any(not torch.allclose(base[n], unmasked[n]) for n in base)


def test_shared_prefix_pass_equals_the_plain_pass(tiny_qwen2, tok):
    from transformers import AutoModelForCausalLM

    from mlx_lora.backends.torch.engine import MaskedLMLoss, shared_prefix
    from mlx_lora.backends.torch.lora import attach
    from mlx_lora.data.batching import pad_batch

    torch.manual_seed(2)
    model = attach(AutoModelForCausalLM.from_pretrained(tiny_qwen2), make_cfg().lora)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.5)
    # Rows of different lengths (right padding) sharing the template + a system prompt, with different questions.
    system = "你是星河科技公司內部的 FAQ 助理,只依據公司規範回答,不知道就說不知道。"
    rows = [
        encode_messages(
            tok,
            [
                {"role": "system", "content": system},
                {"role": "user", "content": q},
                {"role": "assistant", "content": a},
            ],
            96,
        )
        for q, a in [
            ("VPN 怎麼連?", "依據公司規範:VPN 請以 SSO 登入。"),
            ("請假", "依據公司規範:請假請走 eHR 系統並知會主管。"),
            ("VPN 連不上", "依據公司規範:先重開 client。"),
            ("密碼多久換?", "依據公司規範:每 90 天。"),
        ]
    ]
    ids, mask, _ = (torch.tensor(x) for x in pad_batch(rows, 151643))
    common = next(k for k in range(ids.shape[1]) if len(set(ids[:, k].tolist())) > 1)
    assert shared_prefix(ids, mask) == common - 1 >= 16  # everything before the first differing token, less one
    assert shared_prefix(ids[:1], mask[:1]) == 0  # one row: nothing to share
    short = slice(common - 10, None)  # rows whose shared run is only 10 tokens: not worth a prefix pass
    assert shared_prefix(ids[:, short], mask[:, short]) == 0

    def loss_and_grads(share: bool):
        model.zero_grad(set_to_none=True)
        loss = MaskedLMLoss(model.get_base_model(), share_prefix=share)(ids, mask)
        loss.backward()
        return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    plain_loss, plain = loss_and_grads(False)
    shared_loss, shared = loss_and_grads(True)
    assert shared_loss == pytest.approx(plain_loss, rel=1e-5)
    for name in plain:
        assert torch.allclose(shared[name], plain[name], atol=1e-5, rtol=1e-4), name
    # Gradients reach the adapters inside the shared prefix's pass (layer 0 sees only prefix and tail tokens).
    assert all(g.abs().sum() > 0 for g in shared.values())


def test_adapter_loads_in_plain_peft_with_identical_logits(trained, tiny_qwen2, tok):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    plain = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_qwen2), str(trained["run_dir"] / "adapter")
    )
    plain.eval()
    ids = torch.tensor([tok.prompt_ids([{"role": "user", "content": "VPN 怎麼連 3?"}])])
    with torch.no_grad():
        ours = trained["loaded"].model(input_ids=ids).logits
        theirs = plain(input_ids=ids).logits
    assert torch.equal(ours, theirs)
    config = json.loads((trained["run_dir"] / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 8.0 and config["peft_type"] == "LORA"


def test_fuse_writes_a_folder_transformers_loads(trained, tiny_qwen2, tok, tmp_path):
    from transformers import AutoModelForCausalLM

    from mlx_lora.backends.torch.fuse import fuse

    out = fuse(tiny_qwen2, trained["run_dir"], tmp_path / "fused")
    config = json.loads((out / "config.json").read_text())
    assert config["rope_theta"] == 10000.0
    assert (out / "tokenizer.json").is_file() and (out / "chat_template.jinja").is_file()
    merged = AutoModelForCausalLM.from_pretrained(out)
    ids = torch.tensor([tok.prompt_ids([{"role": "user", "content": "VPN 怎麼連 1?"}])])
    with torch.no_grad():
        diff = (merged(input_ids=ids).logits - trained["loaded"].model(input_ids=ids).logits).abs().max()
    assert diff < 1e-4
    assert ChatTokenizer.from_dir(out).prompt_ids([{"role": "user", "content": "hi"}]) == tok.prompt_ids(
        [{"role": "user", "content": "hi"}]
    )


def test_mlx_format_adapter_loads_with_identical_logits(trained, tiny_qwen2, tok, tmp_path):
    from mlx_lora.backends.adapters import peft_to_mlx

    peft_to_mlx(trained["run_dir"] / "adapter", tmp_path / "mlx", num_layers=2)
    assert (tmp_path / "mlx" / "adapters.safetensors").is_file()
    loaded = trained["backend"].load(tiny_qwen2, tmp_path / "mlx", Config())
    ids = torch.tensor([tok.prompt_ids([{"role": "user", "content": "VPN 怎麼連 2?"}])])
    with torch.no_grad():
        diff = (loaded.model(input_ids=ids).logits - trained["loaded"].model(input_ids=ids).logits).abs().max()
    assert diff < 1e-5


def test_an_adapter_from_another_base_model_is_a_one_line_error(trained, tmp_path, qwen_tokenizer_dir):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from mlx_lora.backends.torch import TorchBackend
    from mlx_lora.core.errors import UserError

    other = tmp_path / "other"
    config = Qwen2Config(
        vocab_size=151669,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        rope_theta=10000.0,
    )
    Qwen2ForCausalLM(config).save_pretrained(other)
    with pytest.raises(UserError) as info:
        TorchBackend().load(other, trained["run_dir"] / "adapter", trained["cfg"])
    assert "adapter does not fit this model" in str(info.value) and "\n" not in str(info.value)


def test_an_adapter_whose_tensors_name_no_lora_layer_is_an_error(trained, tiny_qwen2, tmp_path):
    # PEFT alone only warns and returns the base model unchanged: answers would silently be the base model's.
    from safetensors.torch import load_file, save_file

    from mlx_lora.backends.torch import TorchBackend
    from mlx_lora.core.errors import UserError

    renamed = tmp_path / "renamed"
    shutil.copytree(trained["run_dir"] / "adapter", renamed)
    tensors = load_file(str(renamed / "adapter_model.safetensors"))
    save_file(
        {k.replace("lora_A", "lora_X").replace("lora_B", "lora_Y"): v for k, v in tensors.items()},
        str(renamed / "adapter_model.safetensors"),
    )
    with pytest.raises(UserError, match="missing adapter keys"):
        TorchBackend().load(tiny_qwen2, renamed, trained["cfg"])
    TorchBackend().load(tiny_qwen2, trained["run_dir"] / "adapter", trained["cfg"])  # the intact adapter still loads
