"""Bad input gets a clear error that names the argument."""

import pytest
import torch

from rerule import group_advantages, grpo_loss, token_logps


def _ok():
    return dict(
        logits=torch.randn(4, 3, 11),
        completion_ids=torch.randint(0, 11, (4, 3)),
        completion_mask=torch.ones(4, 3),
        advantages=torch.randn(4),
    )


BAD = [
    ("logits-2d", dict(logits=torch.randn(4, 11)), ValueError, "logits"),
    ("logits-int", dict(logits=torch.zeros(4, 3, 11, dtype=torch.long)), TypeError, "logits"),
    ("logits-list", dict(logits=[[1.0]]), TypeError, "logits"),
    ("ids-shape", dict(completion_ids=torch.zeros(4, 2, dtype=torch.long)), ValueError, "completion_ids"),
    ("ids-float", dict(completion_ids=torch.zeros(4, 3)), TypeError, "completion_ids"),
    ("ids-too-big", dict(completion_ids=torch.full((4, 3), 11)), ValueError, "completion_ids"),
    ("ids-negative", dict(completion_ids=torch.full((4, 3), -1)), ValueError, "completion_ids"),
    ("mask-shape", dict(completion_mask=torch.ones(4, 4)), ValueError, "completion_mask"),
    ("adv-shape", dict(advantages=torch.randn(3)), ValueError, "advantages"),
    ("adv-int", dict(advantages=torch.zeros(4, dtype=torch.long)), TypeError, "advantages"),
    ("adv-nan", dict(advantages=torch.tensor([0.0, float("nan"), 0.0, 0.0])), ValueError, "advantages"),
    ("old-shape", dict(old_logps=torch.zeros(4, 2)), ValueError, "old_logps"),
    ("old-nan", dict(old_logps=torch.full((4, 3), float("nan"))), ValueError, "old_logps"),
    ("ref-dtype", dict(ref_logps=torch.zeros(4, 3, dtype=torch.long)), TypeError, "ref_logps"),
    ("beta-without-ref", dict(beta=0.1), ValueError, "ref_logps"),
    ("loss-type", dict(loss_type="ppo"), ValueError, "loss_type"),
    ("is-level", dict(importance_sampling_level="group"), ValueError, "importance_sampling_level"),
    ("impl", dict(impl="cutlass"), ValueError, "impl"),
    ("temperature", dict(temperature=0.0), ValueError, "temperature"),
    ("eps-low", dict(epsilon_low=1.0), ValueError, "epsilon_low"),
    ("eps-negative", dict(epsilon_high=-0.1), ValueError, "epsilon_high"),
    ("dual-clip", dict(dual_clip=0.5), ValueError, "dual_clip"),
    ("is-cap", dict(is_cap=0.0), ValueError, "is_cap"),
    ("delta", dict(delta=-1.0), ValueError, "delta"),
    ("beta-nan", dict(beta=float("nan")), ValueError, "beta"),
    ("max-len", dict(max_completion_length=2), ValueError, "max_completion_length"),
    ("num-items", dict(num_items_in_batch=0), ValueError, "num_items_in_batch"),
    ("adv-and-rewards", dict(rewards=torch.ones(4), group_size=2), ValueError, "exactly one"),
    ("group-size-with-adv", dict(group_size=2), ValueError, "group_size"),
]


@pytest.mark.parametrize("name,override,exc,match", BAD, ids=[b[0] for b in BAD])
def test_bad_input(name, override, exc, match):
    kw = _ok()
    kw.update(override)
    with pytest.raises(exc, match=match):
        grpo_loss(**kw)


def test_rewards_errors():
    kw = _ok()
    del kw["advantages"]
    with pytest.raises(ValueError, match="group_size"):
        grpo_loss(**kw, rewards=torch.ones(4))
    with pytest.raises(ValueError, match="divisible"):
        grpo_loss(**kw, rewards=torch.ones(4), group_size=3)
    with pytest.raises(ValueError, match="group_size"):
        group_advantages(torch.ones(4), 1)
    with pytest.raises(TypeError, match="group_size"):
        group_advantages(torch.ones(4), 2.0)
    with pytest.raises(ValueError, match="scale"):
        group_advantages(torch.ones(4), 2, scale="global")
    with pytest.raises(ValueError, match="rewards"):
        group_advantages(torch.tensor([1.0, float("inf")]), 2)


def test_token_logps_errors():
    with pytest.raises(ValueError, match="completion_ids"):
        token_logps(torch.randn(2, 3, 5), torch.full((2, 3), 5))
    with pytest.raises(ValueError, match="temperature"):
        token_logps(torch.randn(2, 3, 5), torch.zeros(2, 3, dtype=torch.long), temperature=-1.0)
