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


BAD_VALUES = [
    ("mask-nan", dict(completion_mask=torch.tensor([[1.0, float("nan"), 1.0]] * 4)), ValueError, "completion_mask"),
    ("mask-fractional", dict(completion_mask=torch.full((4, 3), 0.5)), ValueError, "completion_mask"),
    ("mask-two", dict(completion_mask=torch.full((4, 3), 2, dtype=torch.long)), ValueError, "completion_mask"),
    ("ids-bool", dict(completion_ids=torch.ones(4, 3, dtype=torch.bool)), TypeError, "completion_ids"),
    ("old-requires-grad", dict(old_logps=torch.zeros(4, 3, requires_grad=True)), ValueError, "old_logps.*detach"),
    ("beh-requires-grad", dict(behavior_logps=torch.zeros(4, 3, requires_grad=True)), ValueError, "behavior_logps"),
    ("ref-positive", dict(ref_logps=torch.full((4, 3), 0.5), beta=0.1), ValueError, "ref_logps"),
    ("temperature-tiny", dict(temperature=1e-40), ValueError, "temperature"),
    ("temperature-huge", dict(temperature=1e30), ValueError, "temperature"),
    ("num-items-2", dict(loss_type="dapo", num_items_in_batch=torch.tensor([3.0, 4.0])), ValueError,
     "num_items_in_batch"),
    ("num-items-str", dict(loss_type="dapo", num_items_in_batch="7"), TypeError, "num_items_in_batch"),
]


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("name,override,exc,match", BAD_VALUES, ids=[b[0] for b in BAD_VALUES])
def test_bad_values(name, override, exc, match, impl):
    kw = _ok()
    kw.update(override)
    with pytest.raises(exc, match=match):
        grpo_loss(**kw, impl=impl)


def test_bool_mask_and_masked_positive_ref_are_fine():
    kw = _ok()
    kw["completion_mask"] = torch.ones(4, 3, dtype=torch.bool)
    kw["completion_mask"][0, 0] = False
    ref = torch.full((4, 3), -1.0)
    ref[0, 0] = 3.0  # under mask 0: never read
    out = grpo_loss(**kw, ref_logps=ref, beta=0.1)
    assert torch.isfinite(out.loss)


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("where", ["nan", "inf", "label-neg-inf"])
def test_inplace_checks_before_overwriting(impl, where):
    kw = _ok()
    x = kw.pop("logits").requires_grad_()
    with torch.no_grad():
        if where == "label-neg-inf":
            x[1, 2, kw["completion_ids"][1, 2]] = float("-inf")
        else:
            x[1, 2, 4] = float(where)
    before = x.detach().clone()
    with pytest.raises(ValueError, match="logits"):
        grpo_loss(x, **kw, impl=impl, inplace=True)
    assert torch.equal(x.detach().nan_to_num(), before.nan_to_num())  # untouched


def test_inplace_checks_log_prob_inputs_before_overwriting():
    kw = _ok()
    x = kw.pop("logits").requires_grad_()
    before = x.detach().clone()
    with pytest.raises(ValueError, match="ref_logps"):
        grpo_loss(x, **kw, ref_logps=torch.full((4, 3), 0.5), beta=0.1, inplace=True)
    assert torch.equal(x.detach(), before)


@pytest.mark.parametrize("value", ["3000", "100", "32768", "abc", "8"])
def test_block_v_env_is_validated(value, monkeypatch):
    monkeypatch.setenv("RERULE_BLOCK_V", value)
    with pytest.raises(ValueError, match="RERULE_BLOCK_V"):
        grpo_loss(**_ok(), impl="triton")


def test_grid_env_is_validated(monkeypatch):
    monkeypatch.setenv("RERULE_GRID", "-1")
    with pytest.raises(ValueError, match="RERULE_GRID"):
        grpo_loss(**_ok(), impl="triton")
