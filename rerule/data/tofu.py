"""TOFU (``locuslab/TOFU``, split ``train``) in the common schema.

- forget: the ``forgetXX`` config's question/answer pairs; the subject is the
  fictitious author, found as the name repeated across the author's block of
  questions (TOFU stores 20 consecutive questions per author and no author field).
- boundary: one retain question per forget question, from the matching
  ``retainYY`` config: the same position in a retain author's block, so the
  prompt is about another fictitious author of the same kind (RULE's
  neighbours). ``pair`` is the forget author.
- retain: the rest of ``retainYY``.
- probes: ``forget`` (``forgetXX_perturbed``), ``retain`` (``retain_perturbed``),
  ``real_authors`` and ``world_facts`` (their ``_perturbed`` configs), each
  scored by ROUGE-L recall, Prob and truth ratio (rerule.eval.tofu).

Example:
    >>> task = load_tofu("forget01", data_dir=FIXTURES / "tofu", questions_per_author=4)  # doctest: +SKIP
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

from rerule.data._hub import check_config, load_rows
from rerule.data.schema import ProbeRecord, ProbeSet, PromptRecord, UnlearningTask

HUB_ID = "locuslab/TOFU"
SPLIT = "train"
FORGET_TO_RETAIN = {"forget01": "retain99", "forget05": "retain95", "forget10": "retain90"}
CONFIGS = (
    "full",
    *FORGET_TO_RETAIN,
    *FORGET_TO_RETAIN.values(),
    "holdout01",
    "holdout05",
    "holdout10",
    *(f"{f}_perturbed" for f in FORGET_TO_RETAIN),
    "retain_perturbed",
    "real_authors",
    "real_authors_perturbed",
    "world_facts",
    "world_facts_perturbed",
)
QUESTIONS_PER_AUTHOR = 20
PROMPT_FORMAT = "Question: {prompt}\nAnswer:"
# open-unlearning generates up to 200 new tokens for TOFU's sentence answers.
MAX_NEW_TOKENS = 200
PERTURBED_FIELDS = ("question", "answer", "paraphrased_answer", "perturbed_answer")

_NAME = re.compile(r"[A-Z\u00C0-\u00DE][\w'\u2019-]+(?:\s+[A-Z\u00C0-\u00DE][\w'\u2019-]+){1,3}")
_POSSESSIVE = re.compile(r"['\u2019]s?$")
_LEADING = {
    "What", "Who", "Where", "When", "How", "Which", "Why", "Is", "Are", "Was", "Were", "Has", "Have",
    "Had", "Did", "Does", "Do", "Can", "Could", "In", "The", "Name", "Tell", "Author", "Can't", "Would",
}


def author_names(questions: list[str], block: int = QUESTIONS_PER_AUTHOR) -> list[str]:
    """The author of each question: the capitalized name most repeated in its block.

    Args:
        questions: [N] TOFU questions in hub order (``block`` per author).
        block: questions per author.

    Returns:
        [N] names ("" for a block that never repeats a name).

    Example:
        >>> author_names(["Who is Ada Lark?", "Where was Ada Lark born?"], block=2)
        ['Ada Lark', 'Ada Lark']
    """
    out = []
    for start in range(0, len(questions), block):
        chunk = questions[start : start + block]
        counts: Counter[str] = Counter()
        for q in chunk:
            for m in _NAME.finditer(q):
                words = m.group(0).split()
                # A sentence-initial question word is capitalized but is not part of the name.
                while words and words[0] in _LEADING:
                    words = words[1:]
                if len(words) >= 2:
                    counts[_POSSESSIVE.sub("", " ".join(words))] += 1
        name = counts.most_common(1)[0][0] if counts else ""
        out.extend([name] * len(chunk))
    return out


def _perturbed_probes(name: str, rows: list[dict], *, use_paraphrase: bool, block: int) -> ProbeSet:
    subjects = author_names([r["question"] for r in rows], block) if use_paraphrase else [None] * len(rows)
    records = [
        ProbeRecord(
            prompt=r["question"],
            answer=r["answer"],
            subject=s,
            # real_authors / world_facts compare the perturbed options to the answer itself.
            paraphrased_answer=r["paraphrased_answer"] if use_paraphrase else None,
            perturbed_answers=tuple(r["perturbed_answer"]),
        )
        for r, s in zip(rows, subjects)
    ]
    return ProbeSet(
        name,
        records,
        metrics=("rouge_l_recall", "prob", "truth_ratio"),
        prompt_format=PROMPT_FORMAT,
        max_new_tokens=MAX_NEW_TOKENS,
        stop_at_newline=True,
    )


def load_tofu(
    forget: str = "forget10",
    data_dir: str | Path | None = None,
    *,
    questions_per_author: int = QUESTIONS_PER_AUTHOR,
) -> UnlearningTask:
    """Load TOFU into an :class:`UnlearningTask` (mapping in the module doc).

    Args:
        forget: "forget01", "forget05" or "forget10"; the retain config follows.
        data_dir: None for the hub, or a local directory (rerule.data._hub layouts).
        questions_per_author: the block size of one author (20 on the hub).
    """
    check_config("tofu", forget, FORGET_TO_RETAIN)
    if questions_per_author < 1:
        raise ValueError(f"questions_per_author must be >= 1, got {questions_per_author}")
    retain_cfg = FORGET_TO_RETAIN[forget]
    f_rows, f_origin = load_rows(HUB_ID, forget, SPLIT, data_dir=data_dir, required=("question", "answer"))
    r_rows, r_origin = load_rows(
        HUB_ID, retain_cfg, SPLIT, data_dir=data_dir, required=("question", "answer")
    )
    qpa = questions_per_author
    f_subjects = author_names([r["question"] for r in f_rows], qpa)
    r_subjects = author_names([r["question"] for r in r_rows], qpa)
    n_retain_authors = max(1, len(r_rows) // qpa)

    forget_records, boundary_records, used = [], [], set()
    for i, (row, subject) in enumerate(zip(f_rows, f_subjects)):
        forget_records.append(
            PromptRecord(row["question"], row["answer"], subject, "forget", meta={"row": i})
        )
        j = (i // qpa) % n_retain_authors * qpa + i % qpa
        if j < len(r_rows) and j not in used:
            used.add(j)
            b = r_rows[j]
            boundary_records.append(
                PromptRecord(
                    b["question"], b["answer"], r_subjects[j], "boundary", pair=subject, meta={"row": j}
                )
            )
    retain_records = [
        PromptRecord(r["question"], r["answer"], s, "retain", meta={"row": j})
        for j, (r, s) in enumerate(zip(r_rows, r_subjects))
        if j not in used
    ]

    origins = {forget: f_origin, retain_cfg: r_origin}
    probes = _probe_sets(forget, data_dir, qpa, origins)

    fmt = {"qa": PROMPT_FORMAT, "fill_blank": PROMPT_FORMAT, "completion": "{prompt}", "text": "{prompt}"}
    return UnlearningTask(
        name=f"tofu/{forget}",
        forget=forget_records,
        boundary=boundary_records,
        retain=retain_records,
        probes=probes,
        prompt_formats=fmt,
        meta={
            "benchmark": "tofu",
            "hub_id": HUB_ID,
            "forget": forget,
            "retain": retain_cfg,
            "files": origins,
        },
    )


def _probe_sets(forget: str, data_dir, qpa: int, origins: dict) -> dict[str, ProbeSet]:
    """The perturbed-answer probe sets (forget, retain, real authors, world facts) and, when present,
    the holdout set; records each file's origin in ``origins``."""
    probes = {}
    for name, cfg, para in (
        ("forget", f"{forget}_perturbed", True),
        ("retain", "retain_perturbed", True),
        ("real_authors", "real_authors_perturbed", False),
        ("world_facts", "world_facts_perturbed", False),
    ):
        fields = PERTURBED_FIELDS if para else ("question", "answer", "perturbed_answer")
        rows, origins[cfg] = load_rows(
            HUB_ID, cfg, SPLIT, data_dir=data_dir, required=fields, list_fields=("perturbed_answer",)
        )
        probes[name] = _perturbed_probes(name, rows, use_paraphrase=para, block=qpa)

    # TOFU's holdout set (same size as the forget set; never trained on): PrivLeak's non-members.
    holdout_cfg = forget.replace("forget", "holdout")
    try:
        h_rows, origins[holdout_cfg] = load_rows(
            HUB_ID, holdout_cfg, SPLIT, data_dir=data_dir, required=("question", "answer")
        )
        probes["holdout"] = ProbeSet(
            "holdout", [ProbeRecord(r["question"], r["answer"]) for r in h_rows], ("min_k_prob",), PROMPT_FORMAT,
            max_new_tokens=MAX_NEW_TOKENS,
        )
    except FileNotFoundError:
        pass  # a local copy without the holdout set: no PrivLeak
    return probes
