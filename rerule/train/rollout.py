"""Rollouts: prompt formatting, batched sampling with Hugging Face ``generate``, and the forward pass
that scores completion tokens.

Layout: a :class:`SeqBatch` holds left-padded prompts and right-padded completions, G rows per prompt
in consecutive runs (TRL's layout, what ``group_advantages`` expects). The completion mask covers the
tokens up to and including the first EOS.

Behavior log-probs are never taken from ``generate``'s scores (those pass through the logits
warpers); they come from a forward of the sampling policy over the sampled tokens, through the
fused ``token_logps`` (``behavior_logps`` below). In the trainer this forward is the update's own
forward: the policy has not moved yet when the loss computes its log-probs, so those are mu exactly
and a replayed group costs no extra pass.

Position ids are ``cumsum(attention_mask) - 1``, the same as ``generate`` uses for left-padded
prompts, so a forward scores exactly the positions the sampler saw.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from rerule.loss import token_logps
from rerule.train.model import base_model


@dataclass
class SeqBatch:
    """prompt_ids / prompt_mask: [B, P] left-padded; completion_ids / completion_mask: [B, T] right-padded."""

    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    completion_ids: torch.Tensor
    completion_mask: torch.Tensor

    def to(self, device) -> SeqBatch:
        return SeqBatch(
            *(
                t.to(device)
                for t in (self.prompt_ids, self.prompt_mask, self.completion_ids, self.completion_mask)
            )
        )

    def __len__(self) -> int:
        return self.completion_ids.shape[0]

    def rows(self, start: int, stop: int, trim: bool = True) -> SeqBatch:
        """Rows [start, stop); with ``trim``, the all-padding columns at the ends are dropped."""
        pm, cm = self.prompt_mask[start:stop], self.completion_mask[start:stop]
        p0, t1 = 0, cm.shape[1]
        if trim:
            p0 = int(pm.ne(0).any(0).to(torch.int8).argmax()) if pm.ne(0).any() else pm.shape[1] - 1
            t1 = int(cm.ne(0).any(0).nonzero().max()) + 1 if cm.ne(0).any() else 1
        ids = self.completion_ids[start:stop, :t1]
        return SeqBatch(self.prompt_ids[start:stop, p0:], pm[:, p0:], ids, cm[:, :t1])

    @staticmethod
    def cat(batches: list[SeqBatch]) -> SeqBatch:
        """Stack batches by rows: prompts left-padded, completions right-padded (id 0, mask 0)."""
        if len(batches) == 1:
            return batches[0]
        P = max(b.prompt_ids.shape[1] for b in batches)
        F = torch.nn.functional
        return SeqBatch(
            torch.cat([F.pad(b.prompt_ids, (P - b.prompt_ids.shape[1], 0)) for b in batches]),
            torch.cat([F.pad(b.prompt_mask, (P - b.prompt_mask.shape[1], 0)) for b in batches]),
            right_pad([b.completion_ids for b in batches], 0),
            right_pad([b.completion_mask for b in batches], 0),
        )


def left_pad(seqs: list[torch.Tensor], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad 1-D int tensors. Returns (ids [N, L], mask [N, L])."""
    L = max(int(s.numel()) for s in seqs)
    ids = torch.full((len(seqs), L), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), L), dtype=torch.long)
    for i, s in enumerate(seqs):
        if s.numel():
            ids[i, L - s.numel() :] = s
            mask[i, L - s.numel() :] = 1
    return ids, mask


def right_pad(blocks: list[torch.Tensor], value) -> torch.Tensor:
    """Concatenate [n_i, T_i] blocks along rows, right-padding columns to the longest T."""
    T = max(b.shape[1] for b in blocks)
    return torch.cat([torch.nn.functional.pad(b, (0, T - b.shape[1]), value=value) for b in blocks])


def use_chat_template(tokenizer, mode: str) -> bool:
    has = getattr(tokenizer, "chat_template", None) is not None
    if mode == "on" and not has:
        raise ValueError("rollout.chat_template=on but the tokenizer has no chat template")
    return has and mode != "off"


def format_prompts(tokenizer, records, task=None, chat_template: str = "auto") -> list[str]:
    """The text each record is sampled from: the chat template around the raw prompt when in use,
    else the task's own prompt format (``task.format_prompt``), else the raw prompt."""
    if use_chat_template(tokenizer, chat_template):
        return [
            tokenizer.apply_chat_template(
                [{"role": "user", "content": r.prompt}], tokenize=False, add_generation_prompt=True
            )
            for r in records
        ]
    if task is not None and hasattr(task, "format_prompt"):
        return [task.format_prompt(r) for r in records]
    return [r.prompt for r in records]


def encode_prompts(tokenizer, texts: list[str], max_prompt_length: int, chat: bool) -> list[torch.Tensor]:
    """Token ids per prompt (1-D int64), cut from the left to ``max_prompt_length``."""
    # A chat template already writes the BOS token; adding special tokens would double it.
    enc = tokenizer(texts, add_special_tokens=not chat)["input_ids"]
    return [torch.tensor(ids[-max_prompt_length:], dtype=torch.long) for ids in enc]


def eos_token_ids(model, tokenizer) -> list[int]:
    ids = getattr(getattr(base_model(model), "generation_config", None), "eos_token_id", None)
    ids = [ids] if isinstance(ids, int) else list(ids or [])
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


def completion_mask_from_eos(ids: torch.Tensor, eos_ids: list[int]) -> torch.Tensor:
    """[B, T] int mask: 1 up to and including the first EOS (everything when there is none)."""
    is_eos = (
        torch.isin(ids, torch.tensor(eos_ids, device=ids.device))
        if eos_ids
        else torch.zeros_like(ids, dtype=torch.bool)
    )
    # Number of EOS strictly before t: a token is valid while none came before it.
    before = is_eos.long().cumsum(-1) - is_eos.long()
    return (before == 0).long()


def autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


@torch.no_grad()
def generate(
    model,
    tokenizer,
    prompts: list[torch.Tensor],
    group_size: int,
    *,
    temperature: float = 1.0,
    top_p: float = 1.0,
    max_new_tokens: int = 64,
    batch_groups: int | None = None,
    amp_dtype: torch.dtype | None = None,
    synced_gpus: bool = False,
) -> tuple[SeqBatch, list[str]]:
    """Sample ``group_size`` completions per prompt (plain temperature sampling, no top-k).

    The model's own ``generation_config`` is set aside while sampling: transformers fills every
    option left unset from it, so a checkpoint shipping temperature 0.6 / top_p 0.9 / a repetition
    penalty would otherwise sample from a different distribution than the one the loss scores.

    Args:
        prompts: N 1-D prompt id tensors.
        synced_gpus: keep stepping until every rank is done (FSDP: each forward is a collective).
    Returns:
        (SeqBatch with N * group_size rows on the model's device, decoded completion texts).
    """
    from transformers import GenerationConfig

    device = next(model.parameters()).device
    eos = eos_token_ids(model, tokenizer)
    gen_cfg = GenerationConfig(do_sample=True, temperature=temperature, top_p=top_p, top_k=0, use_cache=True,
                               max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                               eos_token_id=eos, num_return_sequences=group_size)
    inner = base_model(model)
    saved_cfg, was_training = inner.generation_config, model.training
    inner.generation_config = gen_cfg
    model.eval()
    comps, masks = [], []
    step = batch_groups or len(prompts)
    try:
        for i in range(0, len(prompts), step):
            ids, mask = left_pad(prompts[i : i + step], tokenizer.pad_token_id)
            ids, mask = ids.to(device), mask.to(device)
            with autocast(device, amp_dtype):
                out = model.generate(input_ids=ids, attention_mask=mask, generation_config=gen_cfg,
                                     **({"synced_gpus": True} if synced_gpus else {}))
            comp = out[:, ids.shape[1] :]
            cmask = completion_mask_from_eos(comp, eos)
            comps.append(torch.where(cmask.bool(), comp, torch.full_like(comp, tokenizer.pad_token_id)))
            masks.append(cmask)
    finally:
        inner.generation_config = saved_cfg
        model.train(was_training)
    pad = tokenizer.pad_token_id
    prompt_ids, prompt_mask = left_pad([p for p in prompts for _ in range(group_size)], pad)
    batch = SeqBatch(prompt_ids.to(device), prompt_mask.to(device), right_pad(comps, pad),
                     right_pad(masks, 0))
    kept = [c[m.bool()] for c, m in zip(batch.completion_ids, batch.completion_mask)]
    return batch, tokenizer.batch_decode(kept, skip_special_tokens=True)


def _inputs(batch: SeqBatch):
    input_ids = torch.cat([batch.prompt_ids, batch.completion_ids], dim=1)
    attention = torch.cat([batch.prompt_mask, batch.completion_mask], dim=1)
    position_ids = (attention.cumsum(-1) - 1).clamp(min=0)
    return input_ids, attention, position_ids


def completion_logits(model, batch: SeqBatch) -> torch.Tensor:
    """[B, T, V] logits scoring each completion token (only the T positions are kept)."""
    input_ids, attention, position_ids = _inputs(batch)
    T = batch.completion_ids.shape[1]
    out = model(
        input_ids=input_ids,
        attention_mask=attention,
        position_ids=position_ids,
        logits_to_keep=T + 1,
        use_cache=False,
    )
    return out.logits[:, :-1]


def completion_hidden(model, batch: SeqBatch) -> torch.Tensor:
    """[B, T, H] last hidden states that score each completion token (for the fused-linear loss)."""
    input_ids, attention, position_ids = _inputs(batch)
    P, T = batch.prompt_ids.shape[1], batch.completion_ids.shape[1]
    backbone = base_model(model).get_decoder()
    out = backbone(input_ids=input_ids, attention_mask=attention, position_ids=position_ids, use_cache=False)
    return out.last_hidden_state[:, P - 1 : P + T - 1]


def lm_head(model) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight [V, H], bias [V] or None) of the output layer."""
    head = base_model(model).get_output_embeddings()
    return head.weight, getattr(head, "bias", None)


@torch.no_grad()
def logps_from_hidden(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias,
    batch: SeqBatch,
    temperature: float,
    impl: str = "auto",
    chunk_rows: int = 8,
) -> torch.Tensor:
    """[B, T] fp32 log-probs from hidden states, a few rows at a time (no [B, T, V] at once)."""
    out = []
    for i in range(0, hidden.shape[0], chunk_rows):
        logits = torch.nn.functional.linear(hidden[i : i + chunk_rows], weight, bias)
        logp, _ = token_logps(
            logits,
            batch.completion_ids[i : i + chunk_rows],
            batch.completion_mask[i : i + chunk_rows],
            temperature=temperature,
            impl=impl,
        )
        out.append(logp)
    return torch.cat(out)


@torch.no_grad()
def behavior_logps(
    model,
    batch: SeqBatch,
    temperature: float = 1.0,
    *,
    impl: str = "auto",
    amp_dtype: torch.dtype | None = None,
    chunk_rows: int | None = None,
) -> torch.Tensor:
    """Behavior log-probs mu [B, T] (fp32, 0 on padding): one forward of the sampling policy over the
    sampled tokens, scored by the fused ``token_logps`` at the sampling temperature."""
    device = batch.completion_ids.device
    step = chunk_rows or len(batch)
    out = torch.zeros(batch.completion_ids.shape, dtype=torch.float32, device=device)
    for i in range(0, len(batch), step):
        part = batch.rows(i, i + step)
        with autocast(device, amp_dtype):
            logits = completion_logits(model, part)
        logp, _ = token_logps(
            logits, part.completion_ids, part.completion_mask, temperature=temperature, impl=impl
        )
        out[i : i + step, : logp.shape[1]] = logp
    return out


@dataclass
class FreshGroups:
    """A step's fresh groups as they move through it: the sampled prompts (``idx`` into the pool, ``records``
    repeated G times), the rollout, then its rewards, advantages, per-group mean rewards and reference
    log-probs (``Trainer._score``) and the global batch's token counts (``Trainer._rollout_metrics``)."""

    idx: list[int]
    records: list
    batch: SeqBatch
    texts: list[str]
    rewards: torch.Tensor | None = None
    advantages: torch.Tensor | None = None
    means: torch.Tensor | None = None
    ref: torch.Tensor | None = None
    generated_tokens: int = 0
    completion_length: float = 0.0
