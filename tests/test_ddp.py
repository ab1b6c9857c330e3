"""Data-parallel training on 2 CPU processes (gloo): it runs, only rank 0 writes, and it matches one process."""

from __future__ import annotations

import json
import os
import socket

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from conftest import build_tiny_model
from torch_helpers import adapter_tensors, chat_rows, make_cfg, train

from mlx_lora.data.render import ChatTokenizer


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _data(model_dir):
    tok = ChatTokenizer.from_dir(model_dir)
    return chat_rows(tok, 8), chat_rows(tok, 4, question="VPN 連線")


def _worker(rank: int, world: int, port: int, model_dir, out_dir) -> None:
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    torch.set_num_threads(1)
    rows, valid = _data(model_dir)
    cfg = make_cfg(epochs=2, batch_size=2, grad_accum=1)
    outcome, events, _, loaded = train(model_dir, rows, valid, cfg, out_dir / f"run-rank{rank}")
    from safetensors.torch import save_file

    # Written by the test, not the backend: what each rank ended with, to compare across ranks.
    params = {n: p.detach().contiguous() for n, p in loaded.model.named_parameters() if "lora_" in n}
    save_file(params, str(out_dir / f"params-rank{rank}.safetensors"))
    (out_dir / f"events-rank{rank}.json").write_text(
        json.dumps({"events": events, "steps": outcome.steps, "best": outcome.best_eval_loss})
    )


def test_two_cpu_processes_train_data_parallel(tmp_path, qwen_tokenizer_dir):
    import torch.multiprocessing as mp
    from safetensors.torch import load_file

    model_dir = build_tiny_model(tmp_path / "tiny", tokenizer_dir=qwen_tokenizer_dir)
    # fork: the children inherit the imported torch/transformers instead of paying ~5 s each to import them again.
    mp.start_processes(_worker, args=(2, _free_port(), model_dir, tmp_path), nprocs=2, join=True, start_method="fork")

    assert not (tmp_path / "run-rank1").exists()  # rank 1 wrote nothing: no adapter, checkpoints or metrics
    assert (tmp_path / "run-rank0" / "adapter" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "run-rank0" / "checkpoints" / "step-4").is_dir()
    rank0 = json.loads((tmp_path / "events-rank0.json").read_text())
    rank1 = json.loads((tmp_path / "events-rank1.json").read_text())
    assert rank1["events"] == [] and rank0["steps"] == rank1["steps"] == 4
    assert [e["type"] for e in rank0["events"]].count("step") == 4
    p0, p1 = (
        load_file(str(tmp_path / "params-rank0.safetensors")),
        load_file(str(tmp_path / "params-rank1.safetensors")),
    )
    assert all(torch.equal(p0[k], p1[k]) for k in p0)  # gradients were all-reduced: the ranks agree

    # Two ranks × one batch each = one process accumulating two batches: the same batches, the same update.
    rows, valid = _data(model_dir)
    single, _, _, loaded = train(
        model_dir, rows, valid, make_cfg(epochs=2, batch_size=2, grad_accum=2), tmp_path / "single"
    )
    assert single.steps == 4
    ref = {n: p.detach() for n, p in loaded.model.named_parameters() if "lora_" in n}
    assert ref.keys() == p0.keys()
    for name in ref:
        assert torch.allclose(ref[name], p0[name], atol=1e-6, rtol=1e-4), name
    assert abs(single.best_eval_loss - rank0["best"]) < 1e-5
    saved = adapter_tensors(tmp_path / "run-rank0" / "adapter")
    assert len(saved) == len(ref)
