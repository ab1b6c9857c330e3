"""The real embedded model: join the six wheels, convert, load in transformers and answer in Chinese (minutes)."""

from __future__ import annotations

import json
import re

import pytest

from mlx_lora.core import model_store

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def embedded_dir():
    # No skip when the wheels are missing: resolve_model raises a UserError naming the pip command, and that
    # failure is the point (a silently skipped model test would hide a broken install).
    return model_store.resolve_model("embedded", progress=False)


def test_embedded_folder_has_top_level_rope_theta(embedded_dir):
    config = json.loads((embedded_dir / "config.json").read_text())
    # mlx-lm reads only the top-level key; transformers 5 alone would write it inside rope_parameters only.
    assert config["rope_theta"] == config["rope_parameters"]["rope_theta"] == 1_000_000.0
    assert "quantization_config" not in config
    assert "<|im_start|>" in (embedded_dir / "chat_template.jinja").read_text()


def test_embedded_model_answers_chinese_prompt_greedily(embedded_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(embedded_dir, local_files_only=True, trust_remote_code=False)
    model = AutoModelForCausalLM.from_pretrained(
        embedded_dir, local_files_only=True, trust_remote_code=False, dtype=torch.float32
    )
    assert tokenizer.eos_token == "<|im_end|>"
    inputs = tokenizer.apply_chat_template(
        [{"role": "user", "content": "用一句話介紹台北。"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=24, do_sample=False)
    text = tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert text.strip()
    assert re.search(r"[\u4e00-\u9fff]", text), text
