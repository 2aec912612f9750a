"""What every evaluator asks of a Hugging Face causal LM: greedy replies and answer log-likelihoods.

Both functions batch, handle padding, and run under ``torch.inference_mode``.
The model needs only ``model(input_ids=, attention_mask=).logits`` (and
``model.generate`` for :func:`generate_greedy`); the tokenizer is a
``transformers`` tokenizer.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


def _device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except (StopIteration, AttributeError):
        return torch.device("cpu")


def _pad_id(tokenizer) -> int:
    if tokenizer.pad_token_id is not None:
        return tokenizer.pad_token_id
    if tokenizer.eos_token_id is not None:
        return tokenizer.eos_token_id
    raise ValueError("tokenizer has neither a pad nor an eos token; set tokenizer.pad_token")


def _batches(n: int, batch_size: int, order: list[int]):
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    for start in range(0, n, batch_size):
        yield order[start : start + batch_size]


def _bar(total: int, desc: str | None, progress: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not progress, leave=False)


def generate_greedy(
    model,
    tokenizer,
    prompts: Sequence[str],
    max_new_tokens: int = 32,
    batch_size: int = 8,
    *,
    stop_at_newline: bool = False,
    progress: bool = False,
    desc: str | None = None,
) -> list[str]:
    """Greedy continuations of ``prompts``, batched with left padding.

    Args:
        model: a causal LM with ``generate``.
        tokenizer: its tokenizer (padding side is set to left for the call only).
        prompts: [N] fully formatted prompts (``ProbeSet.format``).
        max_new_tokens: generation length.
        batch_size: prompts per ``generate`` call; prompts are grouped by
            length so that a batch pads little, and returned in input order.
        stop_at_newline: cut each reply at its first newline (QA probes), and
            stop a batch early once every row has produced one.
        progress: show a tqdm bar.

    Returns:
        [N] decoded replies (the new tokens only, special tokens skipped).

    Example:
        >>> generate_greedy(model, tok, ["Question: Where was Ada Lark born?\\nAnswer:"])  # doctest: +SKIP
        [' Velmora']
    """
    from transformers import StoppingCriteria, StoppingCriteriaList

    prompts = list(prompts)
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    pad_id = _pad_id(tokenizer)
    lengths = [len(tokenizer(p).input_ids) for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: -lengths[i])
    out: list[str | None] = [None] * len(prompts)
    device = _device(model)

    class _Newline(StoppingCriteria):
        def __init__(self, start: int):
            self.start = start

        def __call__(self, input_ids, scores, **kwargs):
            texts = tokenizer.batch_decode(input_ids[:, self.start :], skip_special_tokens=True)
            return torch.tensor(["\n" in t for t in texts], device=input_ids.device)

    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    was_training = getattr(model, "training", False)
    model.eval()
    try:
        with torch.inference_mode(), _bar(len(prompts), desc, progress) as bar:
            for idx in _batches(len(prompts), batch_size, order):
                enc = tokenizer([prompts[i] for i in idx], return_tensors="pt", padding=True).to(device)
                start = enc["input_ids"].shape[1]
                stops = StoppingCriteriaList([_Newline(start)]) if stop_at_newline else None
                gen = model.generate(
                    **enc,
                    do_sample=False,
                    max_new_tokens=max_new_tokens,
                    pad_token_id=pad_id,
                    stopping_criteria=stops,
                )
                for i, text in zip(idx, tokenizer.batch_decode(gen[:, start:], skip_special_tokens=True)):
                    out[i] = text.split("\n", 1)[0] if stop_at_newline else text
                bar.update(len(idx))
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return out  # type: ignore[return-value]


def _join(prompt: str, answer: str) -> str:
    # An answer follows its prompt as generated text would: after one space, unless the prompt ends in one.
    if not prompt or prompt[-1].isspace():
        return prompt + answer
    return prompt + " " + answer


def _encode(
    tokenizer, prompt: str, answer: str, max_length: int | None, append_eos: bool = False
) -> tuple[list[int], int]:
    """Token ids of prompt + answer (+ the end-of-sequence token), and the index of the first answer token."""
    text = _join(prompt, answer)
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(text, return_offsets_mapping=True)
        ids, offsets = enc["input_ids"], enc["offset_mapping"]
        # The first real token reaching past the prompt starts the answer: this holds whether the
        # tokenizer's offsets include a leading space or not, and a token straddling the prompt's
        # trailing space and the answer's first word is the one that predicts that word.
        first = next((t for t, (s, e) in enumerate(offsets) if e > s and e > len(prompt)), len(ids))
    else:
        ids = tokenizer(text).input_ids
        first = len(tokenizer(prompt).input_ids) if prompt else 0
    ids = list(ids)
    if max_length is not None and len(ids) > max_length:
        ids = ids[:max_length]
    elif append_eos:
        eos = tokenizer.eos_token_id
        if eos is None:
            raise ValueError("append_eos needs a tokenizer with an eos token")
        # TOFU appends one EOS to the labels unless the sequence fills max_length (or already ends in one).
        if (max_length is None or len(ids) < max_length) and (not ids or ids[-1] != eos):
            ids.append(eos)
    # The first token of a sequence has no context to be predicted from.
    return ids, max(first, 1)


def answer_logprobs(
    model,
    tokenizer,
    prompts: Sequence[str],
    answers: Sequence[str],
    batch_size: int = 8,
    *,
    max_length: int | None = 2048,
    append_eos: bool = False,
    details: bool = False,
    progress: bool = False,
    desc: str | None = None,
) -> list[np.ndarray] | list[dict[str, np.ndarray]]:
    """Per-token log-probabilities of each answer given its prompt.

    The answer is joined to the prompt by a space unless the prompt is empty
    or ends in whitespace. Answer tokens are found from the character offsets
    of the joint tokenization (a fast tokenizer): the first token reaching
    past the prompt and all after it. Tokenizing the joint text, not the two
    parts, scores the answer as the model would generate it.

    Args:
        model: a causal LM (``model(input_ids=, attention_mask=).logits``).
        tokenizer: its tokenizer.
        prompts: [N] formatted prompts ("" for a bare text, e.g. Min-K% probes).
        answers: [N] answers (or texts).
        batch_size: sequences per forward pass (right-padded).
        max_length: truncate each joined sequence to this many tokens (None: no limit).
        append_eos: score the tokenizer's end-of-sequence token after the answer too (TOFU's and
            open-unlearning's answer likelihood), unless the sequence already fills ``max_length``.
        details: return, per answer, a dict of [n] arrays: ``logprob``, ``mu`` and ``sigma2`` (mean
            and variance of the log-prob under the model's next-token distribution: Min-K%++),
            ``argmax`` (greedy teacher-forced prediction) and ``target`` (the answer token ids).

    Returns:
        [N] float64 arrays, one log-prob per answer token (may be empty when
        truncation cut the whole answer); or [N] dicts with ``details``.

    Example:
        >>> lp = answer_logprobs(model, tok, ["Question: Q?\\nAnswer:"], ["Velmora"])  # doctest: +SKIP
        >>> float(np.exp(lp[0].mean()))  # TOFU's length-normalized probability  # doctest: +SKIP
    """
    prompts, answers = list(prompts), list(answers)
    if len(prompts) != len(answers):
        raise ValueError(f"answer_logprobs: {len(prompts)} prompts but {len(answers)} answers")
    pad_id = _pad_id(tokenizer)
    encoded = [_encode(tokenizer, p, a, max_length, append_eos) for p, a in zip(prompts, answers)]
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i][0]))
    out: list[np.ndarray | None] = [None] * len(encoded)
    device = _device(model)
    was_training = getattr(model, "training", False)
    model.eval()
    try:
        with torch.inference_mode(), _bar(len(encoded), desc, progress) as bar:
            for idx in _batches(len(encoded), batch_size, order):
                width = max(len(encoded[i][0]) for i in idx)
                ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
                mask = torch.zeros((len(idx), width), dtype=torch.long)
                for row, i in enumerate(idx):
                    seq = encoded[i][0]
                    ids[row, : len(seq)] = torch.tensor(seq)
                    mask[row, : len(seq)] = 1
                logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits  # [B, L, V]
                for row, i in enumerate(idx):
                    seq, first = encoded[i]
                    if first >= len(seq):
                        empty = np.zeros(0)
                        keys = ("logprob", "mu", "sigma2", "argmax", "target")
                        out[i] = dict.fromkeys(keys, empty) if details else empty
                        continue
                    # Row-wise log-softmax over the answer span only: never a [B, L, V] fp32 copy.
                    span = logits[row, first - 1 : len(seq) - 1]
                    # At least fp32 (bf16 logits lose the tail of the softmax); fp64 models stay fp64.
                    lp = torch.log_softmax(span.to(torch.promote_types(span.dtype, torch.float32)), dim=-1)
                    target = ids[row, first : len(seq)].to(lp.device)
                    token_lp = lp.gather(-1, target[:, None]).squeeze(-1).double().cpu().numpy()
                    if details:
                        prob = lp.exp()
                        mu = (prob * lp).sum(-1)
                        sigma2 = (prob * lp.square()).sum(-1) - mu.square()
                        out[i] = {
                            "logprob": token_lp,
                            "mu": mu.double().cpu().numpy(),
                            "sigma2": sigma2.double().cpu().numpy(),
                            "argmax": lp.argmax(-1).cpu().numpy(),
                            "target": target.cpu().numpy(),
                        }
                    else:
                        out[i] = token_lp
                bar.update(len(idx))
    finally:
        model.train(was_training)
    return out  # type: ignore[return-value]


def mean_logprob(model, tokenizer, prompts, answers, batch_size: int = 8, **kwargs) -> np.ndarray:
    """[N] mean token log-likelihood of each answer (``-`` TOFU's average loss).

    ``np.exp`` of it is TOFU's length-normalized probability. An answer with
    no tokens left after truncation gives NaN.
    """
    lps = answer_logprobs(model, tokenizer, prompts, answers, batch_size, **kwargs)
    return np.array([lp.mean() if lp.size else np.nan for lp in lps], dtype=np.float64)
