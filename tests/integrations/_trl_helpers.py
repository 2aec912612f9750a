"""Helpers of the TRL integration tests (TRL's batch dict, configs, a dataset and a reward)."""

from __future__ import annotations

import random

import torch
from datasets import Dataset

from rerule.integrations.trl import ReplayGRPOConfig

WORDS = ["<pad>", "<eos>", "<bos>", "<unk>"] + [f"w{i}" for i in range(61)]  # V = 65: not a power of two


def dataset():
    return Dataset.from_dict(
        {"prompt": [" ".join(f"w{(7 * i + j) % 61}" for j in range(3 + i % 3)) for i in range(8)]}
    )


def random_reward(completions, **kwargs):
    # Deterministic per completion, spread over [0, 1): groups are rarely flat.
    return [random.Random(c).random() for c in completions]


def config(cls=ReplayGRPOConfig, **kw):
    base = dict(
        output_dir="unused",
        per_device_train_batch_size=4,
        num_generations=4,
        max_completion_length=8,
        bf16=False,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        logging_steps=1,
        use_vllm=False,
        beta=0.0,
    )
    return cls(**{**base, **kw})


def make_inputs(tr, seed=0, B=6, P=5, C=7, off_policy=0.3):
    """The dict TRL's _generate_and_score_completions hands to _compute_loss: left-padded prompts,
    right-padded completions of different lengths, old / ref log-probs near the current policy."""
    g = torch.Generator().manual_seed(seed)
    V = tr.model.config.vocab_size
    prompt_ids = torch.randint(4, V, (B, P), generator=g)
    prompt_mask = torch.ones(B, P, dtype=torch.long)
    prompt_mask[0, :2] = 0
    prompt_ids[0, :2] = 0
    completion_ids = torch.randint(4, V, (B, C), generator=g)
    lengths = torch.tensor([C, 3, 5, 1, C, C - 1][:B])
    completion_mask = (torch.arange(C)[None] < lengths[:, None]).long()
    completion_ids[completion_mask == 0] = 0
    with torch.no_grad():
        cur, _, _ = tr._get_per_token_logps_and_entropies(
            tr.model,
            torch.cat([prompt_ids, completion_ids], 1),
            torch.cat([prompt_mask, completion_mask], 1),
            C,
        )
    return dict(
        prompt_ids=prompt_ids,
        prompt_mask=prompt_mask,
        completion_ids=completion_ids,
        completion_mask=completion_mask,
        advantages=torch.randn(B, generator=g),
        # A per-sequence shift as well, so sequence-level (GSPO) ratios clip too.
        old_per_token_logps=cur
        + off_policy * (torch.randn(B, C, generator=g) + torch.randn(B, 1, generator=g)),
        ref_per_token_logps=cur + 0.3 * torch.randn(B, C, generator=g),
        num_items_in_batch=completion_mask.sum() * 3,
    )


