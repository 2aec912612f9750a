"""The common schema every benchmark loader maps into.

An :class:`UnlearningTask` holds what a RULE / ReRULE run trains on and what an
evaluator scores:

- ``forget``: prompts the model must refuse, each with its subject (the entity
  to forget) and the true reference answer (used to measure leakage);
- ``boundary``: RULE's neighbours, prompts in the same form about a different,
  similar entity, which the model must keep answering (``pair`` names the
  forget subject each one neighbours);
- ``retain``: plain question/answer pairs to preserve;
- ``probes``: named evaluation sets, each with its prompt format and metrics.

Example:
    >>> from rerule.data import synthetic_world
    >>> task = synthetic_world(seed=0, hardness=0.8)
    >>> r = task.forget[0]
    >>> (r.source, r.subject in r.prompt, task.format_prompt(r)[:10])
    ('forget', True, 'Question: ')
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

SOURCES = ("forget", "boundary", "retain")
KINDS = ("qa", "fill_blank", "completion", "text")
METRICS = (
    "rouge_l_recall",
    "rouge_l_f1",
    "refusal_rate",
    "prob",
    "truth_ratio",
    "min_k_prob",
)


@dataclass(frozen=True)
class PromptRecord:
    """One training prompt with its reference answer.

    Attributes:
        prompt: the raw question (or fill-in-the-blank / completion prefix),
            without any prompt format; ``UnlearningTask.format_prompt`` wraps it.
        answer: the true reference answer ("" where the benchmark gives none).
        subject: the entity the prompt is about ("" where the benchmark does
            not name it, e.g. RWKU neighbour probes).
        source: "forget", "boundary" or "retain".
        pair: for a boundary prompt, the forget subject it neighbours.
        kind: "qa", "fill_blank", "completion" or "text"; picks the prompt format.
        meta: benchmark-specific extras (attribute name, template id, level ...).
    """

    prompt: str
    answer: str
    subject: str
    source: str
    pair: str | None = None
    kind: str = "qa"
    meta: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self):
        if self.source not in SOURCES:
            raise ValueError(f"PromptRecord.source must be one of {SOURCES}, got {self.source!r}")
        if self.kind not in KINDS:
            raise ValueError(f"PromptRecord.kind must be one of {KINDS}, got {self.kind!r}")
        if self.source == "boundary" and self.pair is None:
            raise ValueError(f"boundary PromptRecord needs pair (the forget subject): {self.prompt!r}")


@dataclass(frozen=True)
class ProbeRecord:
    """One evaluation item.

    Attributes:
        prompt: the raw question / prefix ("" for a membership-inference text).
        answer: the reference answer, or the whole text for a "text" probe.
        subject: the entity it is about, where known.
        paraphrased_answer: TOFU's paraphrase of ``answer`` (truth ratio).
        perturbed_answers: TOFU's wrong answers (truth ratio, normalized Prob).
        kind: as in :class:`PromptRecord`.
        meta: extras (RWKU level and type ...).
    """

    prompt: str
    answer: str
    subject: str | None = None
    paraphrased_answer: str | None = None
    perturbed_answers: tuple[str, ...] = ()
    kind: str = "qa"
    meta: dict[str, Any] = field(default_factory=dict, compare=False)


@dataclass
class ProbeSet:
    """A named evaluation set.

    Attributes:
        name: e.g. "forget", "neighbor_level2", "privleak_forget".
        records: the items.
        metrics: metric names from :data:`METRICS`, the first is the headline.
        prompt_format: ``str.format`` template with a ``{prompt}`` field.
        prefix: text put before every formatted prompt (MUSE's few-shot examples).
        max_new_tokens: generation length for generated metrics.
        stop_at_newline: cut each generation at its first newline.
        kind_formats: per-kind overrides of ``prompt_format`` (RWKU's level-3
            set mixes fill-in-the-blank and question probes).
    """

    name: str
    records: list[ProbeRecord]
    metrics: tuple[str, ...]
    prompt_format: str = "Question: {prompt}\nAnswer:"
    prefix: str = ""
    max_new_tokens: int = 32
    stop_at_newline: bool = True
    kind_formats: dict[str, str] = field(default_factory=dict)

    def __post_init__(self):
        bad = [m for m in self.metrics if m not in METRICS]
        if not self.metrics or bad:
            raise ValueError(
                f"ProbeSet {self.name!r}: metrics must be a non-empty subset of {METRICS}, got {self.metrics}"
            )
        if "{prompt}" not in self.prompt_format:
            raise ValueError(f"ProbeSet {self.name!r}: prompt_format needs a {{prompt}} field")

    def format(self, record: ProbeRecord) -> str:
        """The exact text fed to the model for ``record``."""
        fmt = self.kind_formats.get(record.kind, self.prompt_format)
        return self.prefix + fmt.format(prompt=record.prompt)

    def __len__(self) -> int:
        return len(self.records)


@dataclass
class UnlearningTask:
    """A benchmark in the common schema (see the module docstring).

    Attributes:
        name: "tofu/forget10", "muse/books", "rwku", "synthetic" ...
        forget, boundary, retain: training records (:class:`PromptRecord`).
        probes: evaluation sets by name.
        prompt_formats: ``kind -> str.format template`` used by ``format_prompt``.
        documents: plain-text documents (a pre-training corpus, where there is one).
        extras: other rows the benchmark ships (e.g. RWKU's refusal corpus).
        meta: provenance (hub id or directory, config names, generator knobs).
    """

    name: str
    forget: list[PromptRecord]
    boundary: list[PromptRecord]
    retain: list[PromptRecord]
    probes: dict[str, ProbeSet] = field(default_factory=dict)
    prompt_formats: dict[str, str] = field(
        default_factory=lambda: {
            "qa": "Question: {prompt}\nAnswer:",
            "fill_blank": "Question: {prompt}\nAnswer:",
            "completion": "{prompt}",
            "text": "{prompt}",
        }
    )
    documents: list[str] = field(default_factory=list)
    extras: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    def format_prompt(self, record: PromptRecord | ProbeRecord) -> str:
        """The text fed to the model for a training record (its kind's format)."""
        return self.prompt_formats[record.kind].format(prompt=record.prompt)

    def corpus(self) -> str:
        """Plain text for pre-training a model on the task's world.

        The documents, or, where the benchmark ships none, every forget,
        boundary and retain pair written in its prompt format.
        """
        if self.documents:
            return "\n\n".join(self.documents) + "\n"
        lines = [f"{self.format_prompt(r)} {r.answer}" for r in (*self.forget, *self.boundary, *self.retain)]
        return "\n\n".join(lines) + "\n"

    def summary(self) -> dict[str, int]:
        """Sizes, for logs: ``{"forget": 8, ..., "probe/forget": 8}``."""
        out = {"forget": len(self.forget), "boundary": len(self.boundary), "retain": len(self.retain)}
        out.update({f"probe/{k}": len(v) for k, v in self.probes.items()})
        return out
