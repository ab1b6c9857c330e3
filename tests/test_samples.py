"""The packaged samples: `data build` works from an empty folder, `init` copies them, and the checkout shares them."""

from conftest import REPO, run_cli

from mlx_lora.core.samples import INIT_FILES, sample_path

cli = run_cli


def test_the_checkout_paths_are_the_packaged_files():
    # One copy: data/ and configs/ in a checkout are the package's files, not copies that could drift apart.
    for relative in INIT_FILES:
        assert (REPO / relative).resolve() == sample_path(relative).resolve(), relative


def test_data_build_from_an_empty_folder_reads_the_packaged_samples(tmp_path):
    out = cli("data", "build", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    notes = [line for line in out.stderr.splitlines() if "packaged samples" in line]
    assert len(notes) == 1 and "data/kb.jsonl" in notes[0] and "data/questions.yaml" in notes[0]
    assert "rules" not in notes[0]  # data build reads no rules: its note names only what it read
    assert (tmp_path / "runs" / "data" / "train.jsonl").is_file()  # written here, not in the package
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs"]


def test_a_local_file_wins_over_the_sample(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "kb.jsonl").write_text("not json\n", encoding="utf-8")
    out = cli("data", "build", cwd=tmp_path)
    assert out.returncode == 2 and "data/kb.jsonl" in out.stderr


def test_init_copies_the_samples_and_refuses_a_non_empty_folder(tmp_path):
    out = cli("init", "proj", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    for relative in INIT_FILES:
        assert (tmp_path / "proj" / relative).read_bytes() == sample_path(relative).read_bytes()
        assert not (tmp_path / "proj" / relative).is_symlink()
    out = cli("init", "proj", cwd=tmp_path)
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(lines) == 1 and "not empty" in lines[0]
    # In the new folder the defaults are found locally: no fallback note.
    out = cli("data", "build", cwd=tmp_path / "proj")
    assert out.returncode == 0, out.stderr
    assert "packaged samples" not in out.stderr
    assert (tmp_path / "proj" / "runs" / "data" / "stats.json").is_file()


def test_run_falls_back_to_the_packaged_default_config(tmp_path, monkeypatch):
    from mlx_lora.commands.options import build_config
    from mlx_lora.core.samples import with_fallback

    monkeypatch.chdir(tmp_path)
    used: list[str] = []
    config = with_fallback("configs/default.yaml", used)  # what `run` does without -c
    assert config == str(sample_path("configs/default.yaml")) and used == ["configs/default.yaml"]
    cfg = build_config(config, (), samples_used=used)
    assert cfg.train.max_steps == 120 and cfg.data.mode == "grounded"
    assert cfg.data.kb == str(sample_path("data/kb.jsonl"))
    assert cfg.train.out == "runs/latest"  # relative: written in the current folder
    assert with_fallback("elsewhere/kb.jsonl", used) == "elsewhere/kb.jsonl"  # only the defaults fall back


def test_the_sample_rules_and_questions_stand_in_only_for_the_sample_kb(tmp_path, monkeypatch):
    from mlx_lora.commands.options import build_config

    monkeypatch.chdir(tmp_path)
    own = tmp_path / "own.jsonl"
    own.write_text('{"doc_id": "loan", "text": "借閱期限 28 天。"}\n', encoding="utf-8")
    cfg = build_config(None, (f"data.kb={own}",))
    # The sample's rules name the sample's docs: with one's own KB no rules file here means no keyword rules.
    assert cfg.rules.path == "configs/rules.yaml" and cfg.data.questions == "data/questions.yaml"
    cfg = build_config(None, ())
    assert cfg.rules.path == str(sample_path("configs/rules.yaml"))
    assert cfg.data.questions == str(sample_path("data/questions.yaml"))


def test_a_rule_for_a_doc_not_in_the_kb_says_how_to_run_without_rules(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "kb.jsonl").write_text('{"doc_id": "loan", "text": "借閱期限 28 天。"}\n', encoding="utf-8")
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "rules.yaml").write_bytes(sample_path("configs/rules.yaml").read_bytes())
    out = cli("rules", "check", "configs/rules.yaml", cwd=tmp_path)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "is not in the knowledge base" in out.stderr and "--rules none" in out.stderr


def test_an_explicit_default_config_falls_back_like_runs(tmp_path, monkeypatch):
    from mlx_lora.commands.options import build_config

    monkeypatch.chdir(tmp_path)
    used: list[str] = []
    cfg = build_config("configs/default.yaml", (), samples_used=used)  # `data build -c configs/default.yaml`
    assert cfg.data.mode == "grounded" and cfg.train.max_steps == 120
