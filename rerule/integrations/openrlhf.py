"""OpenRLHF adapter: a drop-in for ``openrlhf.models.loss.PolicyLoss``.

Same constructor arguments, same ``forward(log_probs, old_log_probs, advantages, action_mask,
rollout_log_probs)`` and the same return tuple ``(loss, clip_ratio, ppo_kl, vllm_kl)``; the clipped
surrogate runs through ``rerule.kernels.grpo_math`` (see ``rerule.integrations._policy_math``).
OpenRLHF is not a dependency. Swap it in where the actor builds its loss::

    from rerule.integrations.openrlhf import PolicyLoss
    actor_loss_fn = PolicyLoss(clip_eps_low=0.2, clip_eps_high=0.28, dual_clip=3.0)

Semantics (OpenRLHF's published PolicyLoss)::

    ppo:   lr = log_probs - old_log_probs                     (per token)
    gspo:  lr = masked mean over the sequence of (log_probs - base), base = rollout_log_probs when the
           vLLM correction is on, else old_log_probs; the ratio is shared by the sequence's tokens
    r = exp(lr);  surr1, surr2 = r * A, clamp(r, 1 - eps_low, 1 + eps_high) * A
    loss_tok = -min(surr1, surr2);  dual clip (A < 0): -max(min(surr1, surr2), dual_clip * A)
    vLLM IS (ppo only), is = exp(old_log_probs - rollout_log_probs), no gradient:
        "tis":          loss_tok *= clamp(is, low, high)
        "icepop":       loss_tok *= is * [low <= is <= high]
        "seq-mask-tis": loss_tok *= is * [low <= exp(masked mean of log is) <= high]
    loss = masked mean over all tokens (token_level_loss) | mean over sequences of the masked mean
    clip_ratio = masked mean of [surr2 < surr1];  ppo_kl = masked mean of -(log_probs - old or base)
    vllm_kl = masked mean of (rollout_log_probs - old_log_probs), or None

Differences from OpenRLHF: fp32 math whatever the input dtype; empty rows / an empty mask give 0
where OpenRLHF divides by zero; ppo_kl always measures the policy ratio (one OpenRLHF release
reported the vLLM log ratio in it when the correction was on).
"""

from __future__ import annotations

import torch
from torch import nn

from rerule.integrations._policy_math import check_same_shape, clipped_surrogate, masked_mean
from rerule.kernels.options import LossOptions

POLICY_LOSS_TYPES = ("ppo", "gspo")
VLLM_IS_TYPES = ("tis", "icepop", "seq-mask-tis")


class PolicyLoss(nn.Module):
    """PPO / GSPO policy loss with OpenRLHF's interface (see the module docstring for the formula).

    Args:
        clip_eps_low, clip_eps_high: clip range [1 - low, 1 + high].
        dual_clip: None or c > 1: for A < 0 the surrogate is bounded below at c * A.
        token_level_loss: masked mean over all tokens (True) or mean of per-sequence means (False).
            GSPO forces False, as OpenRLHF does.
        policy_loss_type: "ppo" or "gspo".
        enable_vllm_is_correction, vllm_is_truncated_threshold ([low, high]), vllm_is_correction_type:
            OpenRLHF's rollout (vLLM) importance-sampling correction.
    """

    def __init__(
        self,
        clip_eps_low: float = 0.2,
        clip_eps_high: float = 0.2,
        dual_clip: float | None = None,
        token_level_loss: bool = True,
        policy_loss_type: str = "ppo",
        enable_vllm_is_correction: bool = False,
        vllm_is_truncated_threshold: list | tuple | None = None,
        vllm_is_correction_type: str = "tis",
    ) -> None:
        super().__init__()
        if policy_loss_type not in POLICY_LOSS_TYPES:
            raise ValueError(f"policy_loss_type must be one of {POLICY_LOSS_TYPES}, got {policy_loss_type!r}")
        if vllm_is_correction_type not in VLLM_IS_TYPES:
            raise ValueError(
                f"vllm_is_correction_type must be one of {VLLM_IS_TYPES}, got {vllm_is_correction_type!r}"
            )
        if enable_vllm_is_correction:
            if vllm_is_truncated_threshold is None or len(vllm_is_truncated_threshold) != 2:
                raise ValueError(
                    "vllm_is_truncated_threshold must be [low, high] when enable_vllm_is_correction=True"
                )
            low, high = vllm_is_truncated_threshold
            if not 0 <= low <= high:
                raise ValueError(
                    f"vllm_is_truncated_threshold must satisfy 0 <= low <= high, got {low}, {high}"
                )
        # LossOptions checks eps (>= 0, eps_low < 1) and dual_clip (> 1) and names the bad one.
        self.options = LossOptions(epsilon_low=float(clip_eps_low), epsilon_high=float(clip_eps_high),
                                   dual_clip=None if dual_clip is None else float(dual_clip))
        self.clip_eps_low, self.clip_eps_high, self.dual_clip = clip_eps_low, clip_eps_high, dual_clip
        self.policy_loss_type = policy_loss_type
        self.token_level_loss = token_level_loss and policy_loss_type != "gspo"
        self.enable_vllm_is_correction = enable_vllm_is_correction
        self.vllm_is_truncated_threshold = vllm_is_truncated_threshold
        self.vllm_is_correction_type = vllm_is_correction_type

    def forward(
        self,
        log_probs: torch.Tensor,
        old_log_probs: torch.Tensor,
        advantages: torch.Tensor,
        action_mask: torch.Tensor | None = None,
        rollout_log_probs: torch.Tensor | None = None,
    ):
        """log_probs (with grad), old_log_probs, advantages, action_mask, rollout_log_probs: [B, T].

        Returns (loss 0-dim fp32, clip_ratio, ppo_kl, vllm_kl or None), the last three detached 0-dim.
        """
        if not isinstance(log_probs, torch.Tensor) or log_probs.dim() != 2:
            raise ValueError("log_probs must be a [B, T] tensor")
        if action_mask is None:
            action_mask = torch.ones_like(log_probs, dtype=torch.bool)
        check_same_shape("log_probs", log_probs, old_log_probs=old_log_probs, advantages=advantages,
                         action_mask=action_mask, rollout_log_probs=rollout_log_probs)
        if self.enable_vllm_is_correction and rollout_log_probs is None:
            raise ValueError("rollout_log_probs is required when enable_vllm_is_correction=True")
        m = action_mask.to(torch.float32)
        lp, old = log_probs.float(), old_log_probs.detach().float()

        if self.policy_loss_type == "ppo":
            tok_lr = lp - old
            lr = tok_lr
        else:
            base = rollout_log_probs.detach().float() if self.enable_vllm_is_correction else old
            tok_lr = lp - base
            lr = masked_mean(tok_lr, m, dim=-1).unsqueeze(-1)

        weights = None
        vllm_kl = None
        if self.enable_vllm_is_correction and self.policy_loss_type == "ppo":
            low, high = self.vllm_is_truncated_threshold
            log_is = old - rollout_log_probs.detach().float()
            is_ = log_is.exp()
            if self.vllm_is_correction_type == "tis":
                weights = is_.clamp(min=low, max=high)
            elif self.vllm_is_correction_type == "icepop":
                weights = is_ * ((is_ >= low) & (is_ <= high))
            else:
                seq_is = masked_mean(log_is, m, dim=-1).exp().unsqueeze(-1)
                weights = is_ * ((seq_is >= low) & (seq_is <= high))
            vllm_kl = masked_mean(-log_is, m)

        loss_tok = clipped_surrogate(lr, advantages, self.options, weights=weights)
        loss = masked_mean(loss_tok, m) if self.token_level_loss else masked_mean(loss_tok, m, dim=-1).mean()

        with torch.no_grad():
            r = lr.detach().exp()
            adv = advantages.float()
            clipped = r.clamp(1 - self.options.epsilon_low, 1 + self.options.epsilon_high) * adv
            clip_ratio = masked_mean((clipped < r * adv).float(), m)
            ppo_kl = masked_mean(-tok_lr.detach(), m)
        return loss, clip_ratio, ppo_kl, vllm_kl
