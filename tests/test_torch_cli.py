"""The torch backend through the command line: train, generate, fuse, exit codes, refused resumes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from mlx_lora.core.config import Config, GenerateConfig

torch.set_num_threads(1)


def _chat_data(folder: Path) -> Path:
    folder.mkdir()
    row = lambda q: json.dumps(
        {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": "依據公司規範:以 SSO 登入。"}]},
        ensure_ascii=False,
    )
    (folder / "train.jsonl").write_text("\n".join(row(f"VPN 問題 {i}") for i in range(8)))
    (folder / "valid.jsonl").write_text(row("VPN 怎麼連?"))
    return folder


def test_cli_train_generate_fuse_end_to_end(tiny_qwen2, tmp_path, capsys):
    from mlx_lora.cli import main

    data = _chat_data(tmp_path / "data")
    run = tmp_path / "run"
    main(
        [
            "train",
            "--backend",
            "torch",
            "--model",
            str(tiny_qwen2),
            "--data",
            str(data),
            "--out",
            str(run),
            "--epochs",
            "2",
            "--no-progress",
            "--set",
            "lora.rank=4",
            "--set",
            "train.batch_size=4",
            "--set",
            "train.grad_accum=1",
        ]
    )
    out = capsys.readouterr().out
    assert "stopped: completed" in out and "steps: 4" in out
    for name in ("manifest.json", "metrics.jsonl", "summary.json", "plots/loss.png", "adapter/adapter_config.json"):
        assert (run / name).is_file(), name
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["backend"] == "torch" and "verdict" in summary["health"]
    main(["generate", "--adapter", str(run), "--max-new-tokens", "5", "--no-progress", "VPN 怎麼連?"])
    streamed = capsys.readouterr().out
    from mlx_lora.backends.loading import load_for_generation

    backend, loaded, tok, system = load_for_generation(None, run, Config(), progress=False)
    prompt = tok.prompt_ids([{"role": "user", "content": "VPN 怎麼連?"}], system)
    (ids,) = backend.generate(loaded, [prompt], GenerateConfig(max_new_tokens=5), tok.stop_ids())
    assert streamed == tok.decode(ids) + "\n"
    main(["fuse", "--adapter", str(run), "--out", str(tmp_path / "fused"), "--backend", "torch"])
    assert (tmp_path / "fused" / "model.safetensors").is_file()
    # Resuming with another LoRA shape fails in one line and leaves the run's manifest and adapter as they were.
    before = {name: (run / name).read_bytes() for name in ("manifest.json", "adapter/adapter_model.safetensors")}
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(
            [
                "train",
                "--backend",
                "torch",
                "--model",
                str(tiny_qwen2),
                "--data",
                str(data),
                "--out",
                str(run),
                "--resume",
                str(run),
                "--epochs",
                "2",
                "--no-progress",
                "--set",
                "lora.rank=8",
                "--set",
                "train.batch_size=4",
                "--set",
                "train.grad_accum=1",
            ]
        )
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and "lora.rank now 8 vs 4" in err and "\n" not in err, err
    assert {name: (run / name).read_bytes() for name in before} == before


def test_cli_train_exit_codes_non_finite_and_resume_of_other_data(tiny_qwen2, tmp_path, capsys):
    from mlx_lora.cli import main

    data = _chat_data(tmp_path / "data")
    base = ["train", "--backend", "torch", "--model", str(tiny_qwen2), "--data", str(data), "--no-progress"]
    with pytest.raises(SystemExit) as info:  # NaN/Inf: exit 3, one line naming the fix
        main([*base, "--out", str(tmp_path / "nan"), "--set", "train.lr=1e30", "--set", "train.max_grad_norm=0"])
    err = capsys.readouterr().err.strip().splitlines()
    assert info.value.code == 3 and err[-1].startswith("error: loss") and "train.lr" in err[-1]
    main([*base, "--out", str(tmp_path / "run"), "--max-steps", "2"])
    with pytest.raises(SystemExit) as info:  # a fresh run into a used folder
        main([*base, "--out", str(tmp_path / "run"), "--max-steps", "2"])
    assert info.value.code == 2 and "already holds a run; pass --resume" in capsys.readouterr().err
    (data / "train.jsonl").write_text((data / "train.jsonl").read_text().replace("問題 7", "問題 8"))
    with pytest.raises(SystemExit) as info:  # same shapes, other data: refused, naming what changed
        main([*base, "--out", str(tmp_path / "run"), "--max-steps", "4", "--resume", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip()
    assert info.value.code == 2 and "data_sha256 now" in err and "\n" not in err
