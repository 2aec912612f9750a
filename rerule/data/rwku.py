"""RWKU (``jinzhuoran/RWKU``) in the common schema.

RWKU gives real-world targets and probes, but no forget or retain corpus.

- forget: by default (``forget_from="probes"``) the ``forget_level1``
  (fill-in-the-blank) and ``forget_level2`` (question) probes of the chosen
  targets, subject = the target. These are also the level-1/2 eval probes,
  as in RWKU's own zero-shot setting. ``forget_from="train_refusal_llama3"``
  takes the questions of RWKU's refusal-tuning corpus instead (no overlap with
  the probes; answer "" because the corpus holds refusals, kept in ``meta``).
- boundary: ``neighbor_level1`` / ``neighbor_level2`` probes; ``pair`` is the
  row's ``subject`` (the target it neighbours) and ``subject`` is "" because
  RWKU does not name the neighbouring entity.
- retain: none. ``documents``: the targets' ``intro`` texts.
- probes: forget_level1/2/3 and neighbor_level1/2 (ROUGE-L recall, RWKU's
  "Please complete the blank…" / "Please briefly answer…" prompts), and
  mia_forget / mia_retain (Min-K% texts).
- extras: ``train_refusal_llama3`` rows where available.
"""

from __future__ import annotations

from pathlib import Path

from rerule.data._hub import check_config, load_rows
from rerule.data.schema import ProbeRecord, ProbeSet, PromptRecord, UnlearningTask

HUB_ID = "jinzhuoran/RWKU"
PROBE_CONFIGS = ("forget_level1", "forget_level2", "forget_level3", "neighbor_level1", "neighbor_level2")
MIA_CONFIGS = ("mia_forget", "mia_retain")
UTILITY_CONFIGS = tuple(
    f"utility_{k}" for k in ("general", "reason", "truthfulness", "factuality", "fluency")
)
TRAIN_CONFIGS = tuple(
    f"train_{k}_{m}" for m in ("llama3", "phi3") for k in ("positive", "negative", "pair", "refusal")
) + ("train_original_passage",)
CONFIGS = ("forget_target", *PROBE_CONFIGS, *MIA_CONFIGS, *UTILITY_CONFIGS, *TRAIN_CONFIGS)
SPLITS = {c: "train" for c in ("forget_target", *TRAIN_CONFIGS)} | {
    c: "test" for c in (*PROBE_CONFIGS, *MIA_CONFIGS, *UTILITY_CONFIGS)
}
FB_FORMAT = "Please complete the blank in the following question.\nQuestion: {prompt}\nAnswer:"
QA_FORMAT = "Please briefly answer the following question.\nQuestion: {prompt}\nAnswer:"
PROBE_FIELDS = ("query", "answer", "subject")
MAX_NEW_TOKENS = 30  # RWKU generates 30 new tokens and stops at a newline (eval_forget.py)


def _rows(config: str, data_dir, required, optional=()):
    check_config("rwku", config, CONFIGS)
    return load_rows(HUB_ID, config, SPLITS[config], data_dir=data_dir, required=required, optional=optional)


def _kind(config: str, query: str) -> str:
    if config.endswith("level1"):
        return "fill_blank"
    if config.endswith("level2"):
        return "qa"
    # Level-3 adversarial probes come in both forms; a blank marks the fill-in ones.
    return "fill_blank" if "___" in query else "qa"


def load_rwku(
    targets: int | list[str] | None = None,
    data_dir: str | Path | None = None,
    *,
    forget_from: str = "probes",
) -> UnlearningTask:
    """Load RWKU into an :class:`UnlearningTask` (module doc).

    Args:
        targets: None for all targets, an int for the first N of
            ``forget_target``, or a list of target names.
        data_dir: None for the hub, or a local directory (rerule.data._hub layouts).
        forget_from: "probes" or "train_refusal_llama3" (module doc).
    """
    check_config("rwku forget_from", forget_from, ("probes", "train_refusal_llama3"))
    tgt_rows, tgt_origin = _rows("forget_target", data_dir, ("target", "intro"))
    chosen = _choose_targets(targets, [r["target"] for r in tgt_rows], tgt_origin)
    keep = set(chosen)
    files = {"forget_target": tgt_origin}

    probes = _probe_sets(data_dir, keep, files)

    extras = {}
    try:
        refusal_rows, files["train_refusal_llama3"] = _rows(
            "train_refusal_llama3", data_dir, ("instruction", "output", "subject"), optional=("input",)
        )
        extras["train_refusal_llama3"] = [r for r in refusal_rows if r["subject"] in keep]
    except FileNotFoundError:
        if forget_from == "train_refusal_llama3":
            raise

    if forget_from == "probes":
        forget = [
            PromptRecord(p.prompt, p.answer, p.subject, "forget", kind=p.kind)
            for name in ("forget_level1", "forget_level2")
            for p in probes[name].records
        ]
    else:
        forget = [
            PromptRecord(r["instruction"], "", r["subject"], "forget", meta={"refusal": r["output"]})
            for r in extras["train_refusal_llama3"]
        ]
    boundary = [
        PromptRecord(p.prompt, p.answer, "", "boundary", pair=p.subject, kind=p.kind)
        for name in ("neighbor_level1", "neighbor_level2")
        for p in probes[name].records
    ]
    fmt = {"qa": QA_FORMAT, "fill_blank": FB_FORMAT, "completion": "{prompt}", "text": "{prompt}"}
    return UnlearningTask(
        name="rwku",
        forget=forget,
        boundary=boundary,
        retain=[],
        probes=probes,
        prompt_formats=fmt,
        documents=[r["intro"] for r in tgt_rows if r["target"] in keep],
        extras=extras,
        meta={
            "benchmark": "rwku",
            "hub_id": HUB_ID,
            "targets": chosen,
            "forget_from": forget_from,
            "files": files,
        },
    )


def _choose_targets(targets, names: list[str], origin: str) -> list[str]:
    """The target names ``targets`` selects (None: all; an int: the first N; a list: those names)."""
    if targets is None:
        return names
    if isinstance(targets, int):
        if targets < 1:
            raise ValueError(f"targets must be >= 1 when an int, got {targets}")
        return names[:targets]
    unknown = [t for t in targets if t not in names]
    if unknown:
        raise ValueError(f"targets {unknown} are not in {origin} (field 'target')")
    return list(targets)


def _probe_sets(data_dir, keep: set[str], files: dict) -> dict[str, ProbeSet]:
    """Every probe and MIA config's ProbeSet, restricted to the ``keep`` targets; records each file's
    origin in ``files``."""
    probes = {}
    for config in (*PROBE_CONFIGS, *MIA_CONFIGS):
        is_mia = config in MIA_CONFIGS
        rows, files[config] = _rows(
            config, data_dir, ("text",) if is_mia else PROBE_FIELDS, optional=("subject", "level", "type")
        )
        rows = [r for r in rows if r.get("subject") is None or r["subject"] in keep]
        if is_mia:
            recs = [ProbeRecord("", r["text"], r.get("subject"), kind="text") for r in rows]
            probes[config] = ProbeSet(config, recs, ("min_k_prob",), "{prompt}", stop_at_newline=False)
            continue
        recs = [
            ProbeRecord(
                r["query"],
                r["answer"],
                r["subject"],
                kind=_kind(config, r["query"]),
                meta={"level": r.get("level"), "type": r.get("type")},
            )
            for r in rows
        ]
        probes[config] = ProbeSet(
            config, recs, ("rouge_l_recall",), QA_FORMAT, max_new_tokens=MAX_NEW_TOKENS,
            kind_formats={"fill_blank": FB_FORMAT},
        )
    return probes
