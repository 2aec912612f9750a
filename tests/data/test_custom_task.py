"""task.name: custom — your own forget / boundary / retain files: formats, the boundary rule, errors that name
file, line and field, and `rerule eval` on the same task."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from rerule.data import load_task
from rerule.data.custom import load_custom

FORGET = [
    {"question": "Where was Mara Quell born?", "answer": "Tessaly", "subject": "Mara Quell"},
    {"question": "What does Oren Vask do?", "answer": "He is a cartographer.", "subject": "Oren Vask"},
]
BOUNDARY = [
    {"question": "Where was Mara Quill born?", "answer": "Varn", "subject": "Mara Quill", "pair": "Mara Quell"},
    {"question": "What does Oren Vale do?", "answer": "He is a tailor.", "subject": "Oren Vale", "pair": ""},
]
RETAIN = [
    {"question": "What is the capital of France?", "answer": "Paris", "subject": "France"},
    {"question": "Where was Mara Quellen born?", "answer": "Lorne", "subject": "Mara Quellen"},
    {"question": "How many legs has a spider?", "answer": 8},
]


def _jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _csv(path: Path, rows) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, sorted({k for r in rows for k in r}))
        w.writeheader()
        w.writerows(rows)
    return path


def test_folder_of_jsonl_csv_parquet(tmp_path):
    import pandas as pd

    _jsonl(tmp_path / "forget.jsonl", FORGET)
    _csv(tmp_path / "boundary.csv", BOUNDARY)
    pd.DataFrame(RETAIN[:2]).to_parquet(tmp_path / "retain.parquet")
    task = load_task("custom", data_dir=tmp_path)
    assert [r.subject for r in task.forget] == ["Mara Quell", "Oren Vask"]
    assert [r.pair for r in task.boundary] == ["Mara Quell", "Oren Vask"]  # empty pair: the nearest subject
    assert [r.answer for r in task.retain] == ["Paris", "Lorne"]
    assert set(task.probes) == {"forget", "boundary", "retain"} and task.meta["benchmark"] == "custom"
    assert task.format_prompt(task.forget[0]) == "Question: Where was Mara Quell born?\nAnswer:"


def test_boundary_rule_without_a_boundary_file(tmp_path):
    _jsonl(tmp_path / "f.jsonl", FORGET)
    _jsonl(tmp_path / "r.jsonl", RETAIN)
    task = load_custom(forget=str(tmp_path / "f.jsonl"), retain=str(tmp_path / "r.jsonl"))
    # len(retain) // 2 = 1 row becomes boundary: the one whose subject is closest to a forget subject.
    assert [(r.subject, r.pair) for r in task.boundary] == [("Mara Quellen", "Mara Quell")]
    assert [r.answer for r in task.retain] == ["Paris", "8"]
    assert task.meta["boundary_rule"].startswith("nearest")
    more = load_custom(forget=str(tmp_path / "f.jsonl"), retain=str(tmp_path / "r.jsonl"), n_boundary=3)
    assert len(more.boundary) == 3 and not more.retain


def test_datasets_folder(tmp_path):
    import datasets

    dd = datasets.DatasetDict({"forget": datasets.Dataset.from_list(FORGET),
                               "retain": datasets.Dataset.from_list(RETAIN[:2])})
    dd.save_to_disk(str(tmp_path / "dd"))
    task = load_task("custom", data_dir=tmp_path / "dd")
    assert len(task.forget) == 2 and len(task.boundary) == 1 and len(task.retain) == 1


@pytest.mark.parametrize(
    "name, content, match",
    [
        ("forget.jsonl", '{"question": "q", "answer": "a", "subject": "s"}\n\n{"question": "q2", "subject": "s"}\n',
         r"forget\.jsonl:3: field 'answer' is missing or empty \(columns: question, subject\)"),
        ("forget.jsonl", '{"question": "q", "answer": "a", "subject": "s"}\n{"question": "q", "answer": "a", '
         '"subject": ["s"]}\n', r"forget\.jsonl:2: field 'subject' must be a string, got list"),
        ("forget.jsonl", "{not json}\n", r"forget\.jsonl:1: not a JSON object"),
        ("forget.csv", "question,answer\nq,a\n", r"forget\.csv:2: field 'subject' is missing or empty"),
        ("forget.txt", "x", r"no forget rows found"),
    ],
    ids=["jsonl-missing", "jsonl-type", "jsonl-syntax", "csv-missing", "no-forget-file"],
)
def test_errors_name_file_line_field(tmp_path, name, content, match):
    (tmp_path / name).write_text(content)
    with pytest.raises(ValueError, match=match):
        load_task("custom", data_dir=tmp_path)


def test_parquet_error_names_row(tmp_path):
    import pandas as pd

    rows = [{"question": "q", "answer": "a", "subject": "s"}, {"question": "q", "answer": None, "subject": "s"}]
    pd.DataFrame(rows).to_parquet(tmp_path / "forget.parquet")
    with pytest.raises(ValueError, match=r"forget\.parquet: row 1: field 'answer' is missing"):
        load_task("custom", data_dir=tmp_path)


def test_hub_id_offline_is_one_line(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(ValueError, match=r"cannot load 'someone/my-facts' from the Hugging Face hub .*task.data_dir"):
        load_task("custom", forget="someone/my-facts")


def test_bad_task_kwargs_are_a_value_error(tmp_path):
    with pytest.raises(ValueError, match="bad task.kwargs"):
        load_task("tofu", data_dir=tmp_path, seed=0)


def test_train_then_eval_a_custom_task(tmp_path, capsys):
    """rerule train and rerule eval on the same custom folder; the checkpoint is an HF folder eval loads."""
    from rerule import cli

    data = tmp_path / "data"
    data.mkdir()
    _jsonl(data / "forget.jsonl", FORGET)
    _csv(data / "boundary.csv", BOUNDARY)
    _jsonl(data / "retain.jsonl", RETAIN[:1])
    out = tmp_path / "run"
    common = ["--task.name", "custom", "--task.data_dir", str(data)]
    argv = ["train", "--config", "smoke", *common, "--output_dir", str(out), "--steps", "2", "--eval_every", "1",
            "--warm_start.epochs", "1", "--rollout.prompts_per_step", "2", "--rollout.max_new_tokens", "4",
            "--rollout.group_size", "2", "--progress", "off", "--tensorboard", "off",
            "--eval-max-examples", "2"]
    assert cli.main(argv) == 0
    rows = [json.loads(r) for r in (out / "metrics.jsonl").read_text().splitlines()]
    assert {"eval/forget_refusal_rate", "eval/boundary_quality", "eval/retain_quality"} <= set(rows[0])
    assert (out / "report" / "reward.png").is_file() and (out / "report" / "summary.md").is_file()
    report = tmp_path / "eval.json"
    argv = ["eval", "--config", "smoke", *common, "--model", str(out / "checkpoints" / "step-000002"),
            "--out", str(report), "--max-new-tokens", "4", "--max-examples", "2", "--no-progress"]
    assert cli.main(argv) == 0
    metrics = json.loads(report.read_text())["metrics"]
    assert set(metrics) == {"forget_leak", "forget_refusal_rate", "boundary_quality", "boundary_over_refusal",
                            "retain_quality", "retain_refusal_rate"}
    assert json.loads(report.read_text())["task"] == "custom/data"
