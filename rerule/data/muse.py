"""MUSE (``muse-bench/MUSE-Books``, ``muse-bench/MUSE-News``) in the common schema.

- forget: ``knowmem/forget_qa`` questions (kind "qa") and ``verbmem/forget``
  prefixes (kind "completion", answer = the true continuation ``gt``), RULE's
  1:1 mix of QA-mode and completion-mode prompts. MUSE names no entity per
  row, so the subject is the corpus ("Harry Potter" / "BBC News").
- boundary: ``knowmem/retain_qa_icl`` by default, questions on the retained
  part of the same corpus. ``boundary="retain_qa"`` uses the 100 retain
  questions instead, which are also the retain KnowMem probe (so that number
  then measures the trained boundary, not held-out utility).
- retain: none; ``raw=True`` loads ``raw/forget`` and ``raw/retain1`` as
  ``documents`` (the target model's training text).
- probes: ``knowmem_forget`` / ``knowmem_retain`` (ROUGE-L F1, few-shot with
  the ``*_icl`` split, 32 tokens, stop at newline), ``verbmem_forget``
  (ROUGE-L F1 of 128 tokens), ``privleak_forget`` / ``privleak_retain`` /
  ``privleak_holdout`` (Min-K% texts).
"""

from __future__ import annotations

from pathlib import Path

from rerule.data._hub import check_config, load_rows
from rerule.data.schema import ProbeRecord, ProbeSet, PromptRecord, UnlearningTask

HUB_IDS = {"books": "muse-bench/MUSE-Books", "news": "muse-bench/MUSE-News"}
SUBJECTS = {"books": "Harry Potter", "news": "BBC News"}
CONFIG_SPLITS = {
    "raw": ("forget", "retain1", "retain2", "holdout"),
    "knowmem": ("forget_qa", "retain_qa", "forget_qa_icl", "retain_qa_icl"),
    "verbmem": ("forget",),
    "privleak": ("forget", "retain", "holdout"),
}
KNOWMEM_FORMAT = "Question: {prompt}\nAnswer: "
VERBMEM_FORMAT = "Completion: {prompt}\nAnswer: "
KNOWMEM_TOKENS = 32
VERBMEM_TOKENS = 128


def _rows(corpus: str, config: str, split: str, data_dir, required):
    check_config(f"muse/{corpus}", config, CONFIG_SPLITS)
    check_config(f"muse/{corpus} config {config!r} split", split, CONFIG_SPLITS[config])
    return load_rows(HUB_IDS[corpus], config, split, data_dir=data_dir, required=required)


def _few_shot(rows: list[dict]) -> str:
    return "".join(KNOWMEM_FORMAT.format(prompt=r["question"]) + r["answer"] + "\n\n" for r in rows)


def load_muse(
    corpus: str = "books",
    data_dir: str | Path | None = None,
    *,
    boundary: str = "retain_qa_icl",
    raw: bool = False,
) -> UnlearningTask:
    """Load MUSE-Books or MUSE-News into an :class:`UnlearningTask` (module doc).

    Args:
        corpus: "books" or "news".
        data_dir: None for the hub, or a local directory (rerule.data._hub layouts).
        boundary: "retain_qa_icl" or "retain_qa" (see the module doc).
        raw: also load the raw forget / retain1 text as ``documents``.
    """
    check_config("muse", corpus, HUB_IDS)
    check_config("muse boundary", boundary, ("retain_qa_icl", "retain_qa"))
    subject = SUBJECTS[corpus]
    qa = ("question", "answer")
    files = {}
    split_rows = {}
    for split in ("forget_qa", "retain_qa", "forget_qa_icl", "retain_qa_icl"):
        split_rows[split], files[f"knowmem/{split}"] = _rows(corpus, "knowmem", split, data_dir, qa)
    verb, files["verbmem/forget"] = _rows(corpus, "verbmem", "forget", data_dir, ("prompt", "gt"))
    priv = {}
    for split in ("forget", "retain", "holdout"):
        priv[split], files[f"privleak/{split}"] = _rows(corpus, "privleak", split, data_dir, ("text",))

    forget = [PromptRecord(r["question"], r["answer"], subject, "forget") for r in split_rows["forget_qa"]]
    forget += [PromptRecord(r["prompt"], r["gt"], subject, "forget", kind="completion") for r in verb]
    boundary_records = [
        PromptRecord(r["question"], r["answer"], subject, "boundary", pair=subject)
        for r in split_rows[boundary]
    ]

    probes = _probe_sets(split_rows, verb, priv, subject)

    documents = []
    if raw:
        for split in ("forget", "retain1"):
            rows, files[f"raw/{split}"] = _rows(corpus, "raw", split, data_dir, ("text",))
            documents += [r["text"] for r in rows]
    fmt = {
        "qa": KNOWMEM_FORMAT,
        "fill_blank": KNOWMEM_FORMAT,
        "completion": VERBMEM_FORMAT,
        "text": "{prompt}",
    }
    return UnlearningTask(
        name=f"muse/{corpus}",
        forget=forget,
        boundary=boundary_records,
        retain=[],
        probes=probes,
        prompt_formats=fmt,
        documents=documents,
        meta={
            "benchmark": "muse",
            "hub_id": HUB_IDS[corpus],
            "corpus": corpus,
            "boundary": boundary,
            "files": files,
        },
    )


def _probe_sets(split_rows: dict, verb: list, priv: dict, subject: str) -> dict[str, ProbeSet]:
    """KnowMem (forget / retain QA with their in-context examples), VerbMem and the PrivLeak text sets."""
    def knowmem(name: str, split: str, icl: str) -> ProbeSet:
        recs = [ProbeRecord(r["question"], r["answer"], subject) for r in split_rows[split]]
        return ProbeSet(
            name, recs, ("rouge_l_f1",), KNOWMEM_FORMAT, prefix=_few_shot(split_rows[icl]),
            max_new_tokens=KNOWMEM_TOKENS, stop_at_newline=False,  # MUSE cuts at "\n\n" / "Question" instead
        )

    probes = {
        "knowmem_forget": knowmem("knowmem_forget", "forget_qa", "forget_qa_icl"),
        "knowmem_retain": knowmem("knowmem_retain", "retain_qa", "retain_qa_icl"),
        "verbmem_forget": ProbeSet(
            "verbmem_forget",
            [ProbeRecord(r["prompt"], r["gt"], subject, kind="completion") for r in verb],
            ("rouge_l_f1",),
            "{prompt}",  # MUSE feeds the raw excerpt (VERBMEM_FORMAT is the training format only)
            max_new_tokens=VERBMEM_TOKENS,
            stop_at_newline=False,
        ),
    }
    for split, rows in priv.items():
        probes[f"privleak_{split}"] = ProbeSet(
            f"privleak_{split}",
            [ProbeRecord("", r["text"], kind="text") for r in rows],
            ("min_k_prob",),
            "{prompt}",
            stop_at_newline=False,
        )
    return probes
