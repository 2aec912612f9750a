"""The README's Python examples run as written (blocks fenced as ```python)."""

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_examples():
    assert BLOCKS


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_example_runs(index, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    exec(compile(BLOCKS[index], f"README.md[python block {index}]", "exec"), {"__name__": "__readme__"})


def _section(title: str) -> str:
    text = README.read_text()
    start = text.index(f"## {title}")
    end = text.find("\n## ", start + 3)
    return text[start:end if end > 0 else None]


def _commands(block: str) -> list[list[str]]:
    """The ``rerule ...`` commands of a bash block, continuation lines joined, comments dropped."""
    import shlex

    joined = block.replace("\\\n", " ")
    return [shlex.split(line.split("  #")[0])[1:] for line in joined.splitlines() if line.startswith("rerule ")]


def test_own_data_walkthrough_runs_as_written(tmp_path, monkeypatch):
    """The "Unlearn your own data" section: its Python block writes the data, then its train / report /
    eval commands run as written, shortened (2 RL steps, 2 warm-start epochs, short replies)."""
    from rerule import cli

    section = _section("Unlearn your own data")
    python = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    bash = re.findall(r"```bash\n(.*?)```", section, flags=re.S)
    assert len(python) == 1 and bash
    monkeypatch.chdir(tmp_path)
    exec(compile(python[0], "README own data", "exec"), {"__name__": "__readme__"})
    short = ["--steps", "2", "--warm_start.epochs", "2", "--rollout.max_new_tokens", "4", "--progress", "off",
             "--eval_every", "0"]
    commands = _commands(bash[0])
    assert [c[0] for c in commands] == ["train", "report", "eval", "eval"]
    for argv in commands:
        argv = [a.replace("step-000030", "step-000002") for a in argv]
        if argv[0] == "train":
            argv += short
        elif argv[0] == "eval":
            argv += ["--max-new-tokens", "4", "--no-progress"]
        assert cli.main(argv) == 0, argv
    assert (tmp_path / "runs/mine/eval.json").is_file() and (tmp_path / "runs/mine/report/summary.md").is_file()
    # The SmolLM2 command parses into a valid config (running it takes minutes).
    smollm2 = _commands(bash[1])[0]
    assert "smollm2" in smollm2 and cli.load_config("smoke", smollm2[3:]).model.name_or_path == "smollm2"
