"""Stage 0 of RULE / ReRULE: a short SFT warm start on refusals for part of the forget prompts (and,
by default, the reference answers of the boundary prompts), so that GRPO starts from a policy that
sometimes refuses."""

from __future__ import annotations

import math

import torch

from rerule.loss import token_logps
from rerule.refusal import REFUSAL_TEMPLATES
from rerule.train.rollout import (
    SeqBatch,
    autocast,
    completion_logits,
    encode_prompts,
    format_prompts,
    left_pad,
    right_pad,
    use_chat_template,
)
from rerule.train.sft import sft_steps

WARM_START_MODES = ("rejection_steering", "with_answers")


def warm_start_examples(
    task, forget_fraction: float, seed: int, mode: str = "with_answers"
) -> list[tuple[object, str]]:
    """(record, target) pairs: refusals naming the subject for a seeded ``forget_fraction`` of the forget
    prompts; with ``mode="with_answers"`` also the reference answer of every boundary prompt.
    ``rejection_steering`` (refusals only) is RULE's warm start."""
    if mode not in WARM_START_MODES:
        raise ValueError(f"warm start mode must be one of {WARM_START_MODES}, got {mode!r}")
    g = torch.Generator().manual_seed(seed)
    n = round(forget_fraction * len(task.forget))
    picked = sorted(torch.randperm(len(task.forget), generator=g)[:n].tolist())
    out = []
    for k, i in enumerate(picked):
        rec = task.forget[i]
        out.append((rec, REFUSAL_TEMPLATES[k % len(REFUSAL_TEMPLATES)].format(subject=rec.subject or "that")))
    if mode == "with_answers":
        out += [(rec, rec.answer) for rec in task.boundary if rec.answer]
    return out


def warm_start(
    model,
    tokenizer,
    task,
    cfg,
    *,
    max_prompt_length: int,
    chat_template: str,
    amp_dtype,
    seed: int,
    kernel_impl: str = "auto",
) -> dict:
    """Stage 0: SFT (token-mean cross-entropy on the target tokens + EOS), AdamW, cosine schedule.

    Returns {"warm_start_steps", "warm_start_loss_first", "warm_start_loss_last"}.
    """
    from transformers import get_cosine_schedule_with_warmup

    examples = warm_start_examples(task, cfg.forget_fraction, seed, getattr(cfg, "mode", "with_answers"))
    if not examples or cfg.epochs <= 0:
        return {"warm_start_steps": 0}
    device = next(model.parameters()).device
    chat = use_chat_template(tokenizer, chat_template)
    prompts = encode_prompts(
        tokenizer,
        format_prompts(tokenizer, [r for r, _ in examples], task, chat_template),
        max_prompt_length,
        chat,
    )
    # A plain "Answer:" prompt is followed by a space; a chat template ends with the assistant header.
    targets = [
        tokenizer(("" if chat else " ") + t, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        for _, t in examples
    ]
    steps = max(1, math.ceil(cfg.epochs * len(examples) / cfg.batch_size))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    sched = get_cosine_schedule_with_warmup(opt, min(cfg.warmup_steps, steps // 2), steps)
    g = torch.Generator().manual_seed(seed + 1)

    def batches():
        """``steps`` batches of example indices, drawn from seeded permutations carried over epochs."""
        order: list[int] = []
        for _ in range(steps):
            if len(order) < cfg.batch_size:
                order += torch.randperm(len(examples), generator=g).tolist()
            idx, order = order[: cfg.batch_size], order[cfg.batch_size :]
            yield idx

    def loss_fn(idx):
        """Token-mean cross-entropy on the target tokens (and EOS) of examples ``idx``."""
        p_ids, p_mask = left_pad([prompts[i] for i in idx], tokenizer.pad_token_id)
        c_ids = right_pad([torch.tensor([targets[i]]) for i in idx], tokenizer.pad_token_id)
        c_mask = right_pad([torch.ones(1, len(targets[i]), dtype=torch.long) for i in idx], 0)
        mb = SeqBatch(p_ids, p_mask, c_ids, c_mask).to(device)
        with autocast(device, amp_dtype):
            logits = completion_logits(model, mb)
        logp, _ = token_logps(logits, mb.completion_ids, mb.completion_mask, impl=kernel_impl)
        return -(logp * mb.completion_mask).sum() / mb.completion_mask.sum()

    model.train()
    losses = sft_steps(params, opt, sched, batches(), loss_fn)
    opt.zero_grad(set_to_none=True)
    return {"warm_start_steps": steps, "warm_start_loss_first": losses[0], "warm_start_loss_last": losses[-1]}
