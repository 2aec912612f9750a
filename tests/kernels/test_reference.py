"""The spec itself: gradcheck in fp64, and agreement with a literal per-token transcription of docs/loss.md."""

import math

import pytest
import torch

from rerule import group_advantages
from rerule.kernels.options import LossOptions
from rerule.kernels.reference import grpo_loss_reference
from tests.kernels._grpo_cases import make_inputs


def literal_loss(inputs, o: LossOptions, max_len=None, num_items=None):
    """docs/loss.md line by line with Python floats: no vectorization, no shared code with the reference."""
    logits, ids, mask, adv = (inputs[k] for k in ("logits", "completion_ids", "completion_mask", "advantages"))
    B, T, V = logits.shape
    old_in, beh_in, ref_in = (inputs.get(k) for k in ("old_logps", "behavior_logps", "ref_logps"))
    logp = [[0.0] * T for _ in range(B)]
    for b in range(B):
        for t in range(T):
            if mask[b, t]:
                row = [float(v) / o.temperature for v in logits[b, t]]
                mx = max(row)
                lse = mx + math.log(sum(math.exp(v - mx) for v in row))
                logp[b][t] = row[int(ids[b, t])] - lse
    loss_tok = [[0.0] * T for _ in range(B)]
    for b in range(B):
        n = sum(int(mask[b, t]) for t in range(T))
        olds = [float(old_in[b, t]) if old_in is not None else logp[b][t] for t in range(T)]
        seq_lr = sum((logp[b][t] - olds[t]) for t in range(T) if mask[b, t]) / max(n, 1)
        A = float(adv[b])
        for t in range(T):
            if not mask[b, t]:
                continue
            lr = seq_lr if o.sequence_level else logp[b][t] - olds[t]
            ratio = math.exp(lr)
            if o.delta is not None:
                ratio = min(ratio, o.delta)
            clipped = min(max(math.exp(lr), 1 - o.epsilon_low), 1 + o.epsilon_high)
            s = min(ratio * A, clipped * A)
            if o.dual_clip is not None and A < 0:
                s = max(s, o.dual_clip * A)
            w = 1.0 if beh_in is None else min(math.exp(olds[t] - float(beh_in[b, t])), o.is_cap)
            kl = 0.0
            if ref_in is not None:
                d = float(ref_in[b, t]) - logp[b][t]
                kl = math.exp(d) - d - 1
                if o.bias_correction_kl:
                    kl *= math.exp(lr)
                if o.is_weight_kl:
                    kl *= w
            loss_tok[b][t] = -(w * s) + o.beta * kl
    tokens = sum(int(mask[b, t]) for b in range(B) for t in range(T))
    total = sum(loss_tok[b][t] for b in range(B) for t in range(T))
    if o.loss_type == "grpo":
        return sum(sum(loss_tok[b]) / max(sum(int(m) for m in mask[b]), 1) for b in range(B)) / B
    if o.loss_type == "bnpo":
        return total / max(tokens, 1)
    if o.loss_type == "dr_grpo":
        return total / (B * (max_len or T))
    return total / max(num_items or tokens, 1)


LITERAL = [
    dict(),
    dict(beta=0.1, temperature=0.8),
    dict(loss_type="bnpo", delta=1.1, dual_clip=1.5),
    dict(loss_type="dr_grpo", importance_sampling_level="sequence", beta=0.05),
    dict(loss_type="dapo", is_cap=1.2, epsilon_high=0.3),
    dict(beta=0.3, bias_correction_kl=True, delta=1.1),
    dict(loss_type="bnpo", importance_sampling_level="sequence", beta=0.3, bias_correction_kl=True),
    dict(beta=0.3, is_weight_kl=True, is_cap=1.3),
]


@pytest.mark.parametrize("opts", LITERAL, ids=lambda d: "-".join(f"{k}={v}" for k, v in d.items()) or "default")
def test_reference_matches_literal_transcription(opts):
    inputs = make_inputs(3, 4, 17, seed=21)
    o = LossOptions(**opts)
    d = lambda k: inputs[k].double()
    loss, *_ = grpo_loss_reference(inputs["logits"].double(), inputs["completion_ids"], inputs["completion_mask"],
                                   d("advantages"), d("old_logps"), d("behavior_logps"), d("ref_logps"), o)
    assert loss.item() == pytest.approx(literal_loss(inputs, o), rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("klis", [False, True])
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_reference_gradcheck_fp64(level, klis):
    # small off-policy gap: finite differences must not straddle a clip kink
    inputs = make_inputs(2, 3, 7, seed=22, off_policy=0.02)
    o = LossOptions(beta=0.2, importance_sampling_level=level, epsilon_low=0.5, epsilon_high=0.5,
                    bias_correction_kl=klis)
    d = lambda k: inputs[k].double()

    def f(x):
        return grpo_loss_reference(x, inputs["completion_ids"], inputs["completion_mask"], d("advantages"),
                                   d("old_logps"), d("behavior_logps"), d("ref_logps"), o)[0]

    x = inputs["logits"].double().requires_grad_()
    assert torch.autograd.gradcheck(f, (x,), eps=1e-6, atol=1e-7)


def test_group_advantages_against_trl_formula():
    r = torch.tensor([1.0, 0.0, 0.5, 0.5, 0.2, 0.9, 0.9, 0.1])
    G = 4
    grouped = r.view(-1, G)
    mean = grouped.mean(1).repeat_interleave(G)
    std_g = grouped.std(1).repeat_interleave(G)
    torch.testing.assert_close(group_advantages(r, G), (r - mean) / (std_g + 1e-4))
    torch.testing.assert_close(group_advantages(r, G, "batch"), (r - mean) / (r.std() + 1e-4))
    torch.testing.assert_close(group_advantages(r, G, "none"), r - mean)
    # a flat group has zero advantage, not NaN
    assert (group_advantages(torch.ones(4), 2) == 0).all()
