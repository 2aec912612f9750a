"""TOFU / MUSE / RWKU loaders on the shipped fixtures, through the real code path."""

import json
import runpy
import shutil

import pyarrow.parquet as pq
import pytest

from rerule.data import FIXTURES, DataFormatError, load_task
from rerule.data.rwku import _rows as rwku_rows
from rerule.data.tofu import author_names

TOFU = FIXTURES / "tofu"
MUSE = FIXTURES / "muse_books"
RWKU = FIXTURES / "rwku"


def test_tofu_fixture_maps_to_schema():
    task = load_task("tofu", forget="forget01", data_dir=TOFU, questions_per_author=4)
    assert task.name == "tofu/forget01"
    assert len(task.forget) == 8 and {r.subject for r in task.forget} == {"Ada Lark", "Basil Orwen"}
    assert task.forget[5].prompt == "What did Basil Orwen's father do?"
    assert task.forget[5].answer == "Basil Orwen's father was a clockmaker."
    # Forget author k pairs with retain author k, question by question.
    assert [(b.subject, b.pair) for b in task.boundary[:1] + task.boundary[4:5]] == [
        ("Celia Marsh", "Ada Lark"),
        ("Dorian Vale", "Basil Orwen"),
    ]
    assert all(b.source == "boundary" for b in task.boundary)
    assert {r.subject for r in task.retain} == {"Elena Quist"}  # the unused retain author
    forget_probe = task.probes["forget"]
    assert forget_probe.records[0].paraphrased_answer == "Velmora is Ada Lark's birthplace."
    assert len(forget_probe.records[0].perturbed_answers) == 3
    ra = task.probes["real_authors"].records[0]
    assert ra.answer == "Jane Austen" and ra.paraphrased_answer is None
    assert forget_probe.format(forget_probe.records[0]) == "Question: Where was Ada Lark born?\nAnswer:"
    assert task.meta["files"]["forget01"].endswith("forget01.json")


def test_author_names_skips_question_words_and_possessives():
    qs = [
        "What is Ada Lark's genre?",
        "Where was Ada Lark born?",
        "Who mentored Bo Lind?",
        "Is Bo Lind tall?",
    ]
    assert author_names(qs, block=2) == ["Ada Lark", "Ada Lark", "Bo Lind", "Bo Lind"]


def test_muse_fixture_parquet_layout():
    task = load_task("muse", forget="books", data_dir=MUSE, raw=True)
    kinds = [r.kind for r in task.forget]
    assert kinds == ["qa"] * 3 + ["completion"] * 2
    assert task.forget[3].answer == "counted its turns until the gulls woke."
    assert [b.prompt for b in task.boundary][0] == "What does the Pellham bakery sell on Sundays?"
    km = task.probes["knowmem_forget"]
    assert km.format(km.records[0]) == (
        "Question: What is the lighthouse made of?\nAnswer: grey granite\n\n"
        "Question: Who is the keeper of the lighthouse at Gull Rock?\nAnswer: "
    )
    vm = task.probes["verbmem_forget"]
    # MUSE's verbmem.py feeds the raw excerpt and generates 128 tokens; KnowMem is cut by the evaluator.
    assert vm.max_new_tokens == 128 and vm.format(vm.records[0]) == "The lamp at Gull Rock turned all night, and Morwen"
    assert not km.stop_at_newline
    assert task.probes["privleak_holdout"].metrics == ("min_k_prob",)
    assert len(task.documents) == 4
    assert task.meta["files"]["knowmem/forget_qa"].endswith("forget_qa-00000-of-00001.parquet")


def test_rwku_fixture_target_filter_and_formats():
    task = load_task("rwku", data_dir=RWKU, targets=["Marie Curie"])
    assert {r.subject for r in task.forget} == {"Marie Curie"}
    assert [r.kind for r in task.forget] == ["fill_blank", "qa"]
    assert [(b.subject, b.pair, b.answer) for b in task.boundary][0] == ("", "Marie Curie", "Physics")
    l3 = task.probes["forget_level3"]
    assert l3.records[0].kind == "fill_blank"  # "___" in an adversarial probe
    assert l3.format(l3.records[0]).startswith("Please complete the blank in the following question.\n")
    l2 = task.probes["forget_level2"]
    assert l2.format(l2.records[0]).startswith("Please briefly answer the following question.\n")
    assert task.extras["train_refusal_llama3"][0]["subject"] == "Marie Curie"
    assert task.documents == ["Marie Curie was a physicist and chemist who studied radioactivity."]
    refusal_task = load_task("rwku", data_dir=RWKU, targets=1, forget_from="train_refusal_llama3")
    assert [(r.prompt, r.answer) for r in refusal_task.forget] == [
        ("What is Stephen King's most famous novel?", "")
    ]


def test_hub_and_local_share_the_code_path(monkeypatch):
    import datasets

    calls = []
    real = datasets.load_dataset

    def fake(path, name=None, split=None, **kw):
        calls.append((path, name, split, kw.get("data_files")))
        if path in ("json", "parquet"):
            return real(path, split=split, **kw)
        # Serve the hub call from the fixture file, as the hub would serve it.
        return datasets.Dataset.from_list(
            [json.loads(x) for x in (TOFU / f"{name}.json").read_text().splitlines()]
        )

    monkeypatch.setattr(datasets, "load_dataset", fake)
    local = load_task("tofu", forget="forget01", data_dir=TOFU, questions_per_author=4)
    from_hub = load_task("tofu", forget="forget01", data_dir=None, questions_per_author=4)
    assert calls[0] == ("json", None, "train", str(TOFU / "forget01.json"))
    assert ("locuslab/TOFU", "forget01", "train", None) in calls
    assert local.forget == from_hub.forget and local.boundary == from_hub.boundary
    assert from_hub.meta["files"]["forget01"] == "locuslab/TOFU:forget01/train"


def _copy(src, tmp_path):
    dst = tmp_path / src.name
    shutil.copytree(src, dst)
    return dst


def _rewrite_jsonl(path, edit):
    rows = [json.loads(x) for x in path.read_text().splitlines()]
    edit(rows)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_missing_field_names_file_row_and_field(tmp_path):
    d = _copy(TOFU, tmp_path)
    _rewrite_jsonl(d / "forget01.json", lambda rows: rows[2].pop("answer"))
    with pytest.raises(DataFormatError) as e:
        load_task("tofu", forget="forget01", data_dir=d, questions_per_author=4)
    msg = str(e.value)
    assert str(d / "forget01.json") in msg and "row 2" in msg and "'answer'" in msg


def test_missing_column_and_wrong_type(tmp_path):
    d = _copy(RWKU, tmp_path)
    _rewrite_jsonl(d / "neighbor_level2" / "test.jsonl", lambda rows: [r.pop("query") for r in rows])
    with pytest.raises(DataFormatError, match=r"neighbor_level2/test\.jsonl: row 0: missing field 'query'"):
        load_task("rwku", data_dir=d)
    d2 = _copy(TOFU, tmp_path / "t")
    _rewrite_jsonl(d2 / "retain_perturbed.json", lambda rows: rows[1].__setitem__("perturbed_answer", "oops"))
    with pytest.raises(
        DataFormatError, match=r"retain_perturbed\.json: row 1: field 'perturbed_answer' must be a"
    ):
        load_task("tofu", forget="forget01", data_dir=d2, questions_per_author=4)


def test_parquet_missing_column(tmp_path):
    d = _copy(MUSE, tmp_path)
    path = d / "verbmem" / "forget-00000-of-00001.parquet"
    pq.write_table(pq.read_table(path).drop(["gt"]), path)
    with pytest.raises(DataFormatError, match=r"forget-00000-of-00001\.parquet: row 0: missing field 'gt'"):
        load_task("muse", data_dir=d)


def test_wrong_config_names():
    with pytest.raises(ValueError, match=r"tofu: unknown config 'forget11'"):
        load_task("tofu", forget="forget11", data_dir=TOFU)
    with pytest.raises(ValueError, match=r"muse: unknown config 'comics'"):
        load_task("muse", forget="comics", data_dir=MUSE)
    with pytest.raises(ValueError, match=r"rwku: unknown config 'forget_level9'"):
        rwku_rows("forget_level9", RWKU, ("query",))
    with pytest.raises(ValueError, match="benchmark must be one of"):
        load_task("wmdp")
    with pytest.raises(FileNotFoundError, match=r"config 'forget05' split 'train'"):
        load_task("tofu", forget="forget05", data_dir=TOFU)


def test_fixtures_are_what_the_script_makes(tmp_path):
    # run_path, not import: no __pycache__ lands among the packaged fixtures.
    mf = runpy.run_path(str(FIXTURES / "make_fixtures.py"), run_name="make_fixtures")
    mf["make_tofu"](tmp_path / "tofu")
    mf["make_rwku"](tmp_path / "rwku")
    mf["make_muse_books"](tmp_path / "muse_books")
    data = {".json", ".jsonl", ".parquet"}
    shipped = sorted(p.relative_to(FIXTURES) for p in FIXTURES.rglob("*") if p.suffix in data)
    made = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    assert shipped == made
    for rel in made:
        if rel.suffix == ".parquet":
            assert pq.read_table(FIXTURES / rel).to_pylist() == pq.read_table(tmp_path / rel).to_pylist()
        else:
            assert (FIXTURES / rel).read_text() == (tmp_path / rel).read_text()
