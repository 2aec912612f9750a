"""Public fused-linear GRPO loss: the loss of ``grpo_loss`` on ``hidden @ weight.T + bias``, computed in
row chunks so the [tokens, vocab] logits are never held whole (design and costs:
``rerule.kernels.fused_linear``)."""

from __future__ import annotations

import numbers

import torch

from rerule.kernels.fused_linear import fused_linear_grpo
from rerule.loss import LOSS_ARGUMENTS, GRPOLossOutput, check_loss_inputs, check_tensor, loss_output

_LIKE = "hidden"
_NOT_FINITE = "hidden/weight/bias (a NaN/inf entry, or a logit of -inf on a selected completion token)"


def _check_linear(hidden, weight, bias):
    check_tensor("hidden", hidden, ndim=3, floating=True)
    check_tensor("weight", weight, ndim=2, floating=True)
    B, T, H = hidden.shape
    V, H_w = weight.shape
    if H_w != H:
        raise ValueError(
            f"weight must be [V, H] with H = hidden.shape[-1] = {H}, got weight of shape {tuple(weight.shape)}"
        )
    if V == 0:
        raise ValueError("weight has an empty vocab dimension (V = 0)")
    if weight.device != hidden.device:
        raise ValueError(f"weight is on {weight.device} but hidden is on {hidden.device}")
    if weight.dtype != hidden.dtype:
        raise TypeError(
            f"weight dtype {weight.dtype} differs from hidden dtype {hidden.dtype}: cast one of them "
            "(the GEMM runs in one input dtype, with fp32 accumulation)"
        )
    if bias is not None:
        check_tensor("bias", bias, shape=(V,), floating=True, device=hidden.device, like=_LIKE)
        if bias.dtype != hidden.dtype:
            raise TypeError(f"bias dtype {bias.dtype} differs from hidden/weight dtype {hidden.dtype}")
    return B, T, H, V


def fused_linear_grpo_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor | None = None,
    advantages: torch.Tensor | None = None,
    *,
    bias: torch.Tensor | None = None,
    chunk_size: int | None = None,
    rewards: torch.Tensor | None = None,
    group_size: int | None = None,
    old_logps: torch.Tensor | None = None,
    behavior_logps: torch.Tensor | None = None,
    ref_logps: torch.Tensor | None = None,
    temperature: float = 1.0,
    epsilon_low: float = 0.2,
    epsilon_high: float = 0.2,
    delta: float | None = None,
    dual_clip: float | None = None,
    beta: float = 0.0,
    loss_type: str = "grpo",
    importance_sampling_level: str = "token",
    is_cap: float = 2.0,
    is_mode: str = "token_truncate",
    is_cap_min: float | None = None,
    is_ratio: torch.Tensor | None = None,
    bias_correction_kl: bool = False,
    is_weight_kl: bool = False,
    max_completion_length: int | None = None,
    num_items_in_batch: float | torch.Tensor | None = None,
    gradient_accumulation_steps: int = 1,
    steps_per_generation: int | None = None,
    num_processes: int = 1,
    scale_rewards: str = "group",
    return_entropy: bool = False,
    impl: str = "auto",
) -> GRPOLossOutput:
    """The GRPO loss of ``grpo_loss(hidden @ weight.T + bias, ...)`` without the [B, T, V] logits.

    Args:
        hidden: [B, T, H] last hidden states; row t scores completion token t (shift them the way
            you would shift the logits). Any float dtype; weight and bias must have the same one.
        weight: [V, H] the lm_head weight. bias: [V] or None.
        completion_ids: [B, T] integer ids in [0, V). completion_mask: [B, T], nonzero = real token.
        advantages: [B]; or ``rewards`` [B] with ``group_size`` (advantages computed here).
        chunk_size: valid (mask 1) rows per GEMM chunk; default keeps one chunk's fp32 logits at
            ~64 MB on CPU (~1 GiB on GPU). Padding rows are dropped before any GEMM.
        old_logps, behavior_logps, ref_logps, temperature, epsilon_low, epsilon_high, delta,
        dual_clip, beta, loss_type, importance_sampling_level, is_cap, is_mode, is_cap_min, is_ratio,
        bias_correction_kl, is_weight_kl, max_completion_length, num_items_in_batch,
        gradient_accumulation_steps, steps_per_generation, num_processes, scale_rewards,
        return_entropy: exactly as in ``grpo_loss``.
        impl: "auto" (Triton kernel on CUDA, torch on CPU), "torch", "triton" or "cuda"; the GEMMs
            are torch matmuls (cuBLAS on GPU) whatever the impl.

    Returns:
        GRPOLossOutput(loss, logps, entropy, metrics), as ``grpo_loss``. The loss is differentiable
        w.r.t. hidden, weight and bias. grad_weight is accumulated over chunks in fp32 and cast to
        weight's dtype at the end. Token-level losses cost 6·N·H·V FLOPs (N = valid tokens),
        sequence-level 8·N·H·V (a second pass recomputes the logits).

    Example:
        >>> import torch
        >>> from rerule import fused_linear_grpo_loss
        >>> hidden = torch.randn(4, 7, 16, requires_grad=True)
        >>> weight = torch.randn(50, 16, requires_grad=True)
        >>> ids = torch.randint(0, 50, (4, 7))
        >>> out = fused_linear_grpo_loss(hidden, weight, ids, torch.ones(4, 7),
        ...                              rewards=torch.tensor([1., 0., 1., 1.]), group_size=2)
        >>> out.loss.backward()
        >>> weight.grad.shape
        torch.Size([50, 16])
    """
    B, T, H, V = _check_linear(hidden, weight, bias)
    if chunk_size is not None:
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, numbers.Integral):
            raise TypeError(f"chunk_size must be an int, got {type(chunk_size).__name__}")
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    args = {name: value for name, value in locals().items() if name in LOSS_ARGUMENTS}
    c = check_loss_inputs(
        (B, T, V), hidden.device, completion_ids, completion_mask, advantages, args, like=_LIKE, not_finite=_NOT_FINITE
    )
    loss, logp, ent = fused_linear_grpo(
        hidden, weight, bias, c.ids, c.mask, c.advantages, c.old, c.behavior, c.ref, c.options, c.impl, c.reduction,
        return_entropy, chunk_size,
    )
    return loss_output(c, loss, logp, ent)
