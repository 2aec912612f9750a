"""Parity with Liger-Kernel's GRPO losses where the semantics overlap.

Liger's chunked ``LigerFusedLinearGRPOLoss`` runs as torch on CPU; its Triton ``triton_grpo_loss``
runs under the interpreter. Their vLLM IS ratio multiplies the policy term like our behavior
weight w, so we pass behavior_logps = old - log(ratio) with ratio <= is_cap.
"""

import pytest
import torch

from rerule import grpo_loss
from tests.kernels._grpo_cases import assert_grad_close

liger_chunked = pytest.importorskip("liger_kernel.chunked_loss")
from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss  # noqa: E402
from liger_kernel.transformers.grpo_loss import triton_grpo_loss  # noqa: E402

CASES = [
    dict(loss_type="grpo", beta=0.0),
    dict(loss_type="bnpo", beta=0.04),
    dict(loss_type="dr_grpo", beta=0.04, max_completion_length=9),
    dict(loss_type="dapo", beta=0.1, num_items_in_batch=23),
    dict(loss_type="grpo", beta=0.04, importance_sampling_level="sequence"),
    dict(loss_type="bnpo", beta=0.0, delta=1.1, temperature=0.8),
    dict(loss_type="dapo", beta=0.04, epsilon_high=0.28, vllm=True),
]


def _inputs(B=4, T=6, H=16, V=97, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(B, T, H, generator=g)
    W = torch.randn(V, H, generator=g) * 0.5
    ids = torch.randint(0, V, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, 4:] = 0
    adv = torch.randn(B, generator=g)
    with torch.no_grad():
        cur = torch.log_softmax(h @ W.T, -1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    old = cur + 0.3 * torch.randn(B, T, generator=g)
    ref = cur + 0.3 * torch.randn(B, T, generator=g)
    ratio = torch.exp(0.4 * torch.randn(B, T, generator=g)).clamp(max=2.0)
    return h, W, ids, mask, adv, old, ref, ratio


def _ours(h, W, ids, mask, adv, old, ref, ratio, case, impl="torch"):
    case = dict(case)
    vllm = case.pop("vllm", False)
    hh, WW = h.clone().requires_grad_(), W.clone().requires_grad_()
    out = grpo_loss(hh @ WW.T, ids, mask, adv, old_logps=old, ref_logps=ref,
                    behavior_logps=(old - ratio.log()) if vllm else None, is_cap=2.0, impl=impl, **case)
    out.loss.backward()
    return out, hh.grad, WW.grad


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_parity_with_liger_chunked(case):
    h, W, ids, mask, adv, old, ref, ratio = _inputs()
    ours, gh, gW = _ours(h, W, ids, mask, adv, old, ref, ratio, case)
    c = dict(case)
    vllm = c.pop("vllm", False)
    liger = LigerFusedLinearGRPOLoss(
        beta=c.get("beta", 0.0), compiled=False, use_ref_model=True, chunk_size=2,
        epsilon_low=c.get("epsilon_low", 0.2), epsilon_high=c.get("epsilon_high", 0.2), loss_type=c["loss_type"],
        max_completion_length=c.get("max_completion_length"),
        importance_sampling_level=c.get("importance_sampling_level", "token"),
        temperature=c.get("temperature", 1.0), delta=c.get("delta"),
    )
    hl, Wl = h.clone().requires_grad_(), W.clone().requires_grad_()
    loss, _ = liger(hl, Wl, ids, mask, adv, ref_per_token_logps=ref, old_per_token_logps=old,
                    vllm_is_ratio=ratio if vllm else None, num_items_in_batch=c.get("num_items_in_batch"))
    loss.backward()
    assert ours.loss.item() == pytest.approx(loss.item(), rel=1e-5, abs=1e-7)
    assert_grad_close(gh, hl.grad, 1e-4, "grad_hidden", tokens=ids.numel())
    assert_grad_close(gW, Wl.grad, 1e-4, "grad_weight", tokens=ids.numel())


@pytest.mark.parametrize("case", [CASES[1], CASES[4], CASES[6]], ids=["bnpo", "sequence", "dapo-vllm"])
def test_parity_with_liger_triton_interpreted(case):
    h, W, ids, mask, adv, old, ref, ratio = _inputs(B=2, T=4, V=61, seed=1)
    ours, _, _ = _ours(h, W, ids, mask, adv, old, ref, ratio, case, impl="triton")
    c = dict(case)
    vllm = c.pop("vllm", False)
    logits = (h @ W.T).detach()
    # Liger takes [B, T+1, V] and drops the last position
    logits_l = torch.cat([logits, torch.zeros(2, 1, 61)], dim=1).requires_grad_()
    ours_logits = logits.clone().requires_grad_()
    out = grpo_loss(ours_logits, ids, mask, adv, old_logps=old, ref_logps=ref,
                    behavior_logps=(old - ratio.log()) if vllm else None, impl="triton", **c)
    out.loss.backward()
    loss, _ = triton_grpo_loss(
        logits_l, old, ref, ids, adv, mask, temperature=c.get("temperature", 1.0), beta=c.get("beta", 0.0),
        eps_low=c.get("epsilon_low", 0.2), eps_high=c.get("epsilon_high", 0.2), inplace=False,
        loss_type=c["loss_type"], max_completion_length=c.get("max_completion_length"),
        importance_sampling_level=c.get("importance_sampling_level", "token"), reduce=True,
        vllm_is_ratio=ratio if vllm else None, num_items_in_batch=c.get("num_items_in_batch"),
    )
    loss.backward()
    assert ours.loss.item() == pytest.approx(loss.item(), rel=1e-5, abs=1e-7)
    assert out.loss.item() == pytest.approx(loss.item(), rel=1e-5, abs=1e-7)
    assert_grad_close(ours_logits.grad, logits_l.grad[:, :-1], 1e-4)
