"""The loss options shared by every backend (reference, torch, Triton, CUDA).

One frozen dataclass instead of twenty positionals: it is hashable, so it can ride
through ``torch.autograd.Function`` and pick Triton constexpr specializations.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
IS_LEVELS = ("token", "sequence")
ADV_SCALES = ("group", "batch", "none")
# TRL's vLLM importance-sampling correction modes (vllm_importance_sampling_mode), applied to the
# behavior / sampling log-probs; computed in torch (grpo_math.importance_weights), not in the kernels.
IS_MODES = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")
TEMPERATURE_RANGE = (1e-6, 1e6)


@dataclass(frozen=True)
class LossOptions:
    """Options of the GRPO loss (see docs/loss.md).

    temperature: logits are divided by it before the softmax (a true division, as eager torch does);
        within [1e-6, 1e6], so the scaled logits stay finite in fp32.
    epsilon_low / epsilon_high: PPO clip range [1 - eps_low, 1 + eps_high].
    delta: optional upper bound on the unclipped ratio (TRL's two-sided clipping).
    dual_clip: optional c > 1; for A < 0 the surrogate is bounded below at c * A (verl).
    beta: k3 KL coefficient (needs ref_logps when > 0).
    loss_type: grpo | bnpo | dr_grpo | dapo (TRL's normalizers).
    importance_sampling_level: token | sequence (GSPO: masked mean of the log ratio).
    is_cap: truncation of the behavior weight w = min(exp(old - behavior), is_cap) (the kernels' form;
        TRL's other vLLM modes are computed in torch by grpo_math.importance_weights and reach the
        kernels as behavior = old - log(w) with no cap).
    bias_correction_kl: multiply the k3 KL term by the (unclipped) policy ratio, making its
        gradient the unbiased reverse-KL gradient (DeepSeek-V3.2; TRL's use_bias_correction_kl).
    is_weight_kl: let the behavior weight w multiply the KL term too (default: the policy term
        only). For replayed, off-policy tokens the k3 gradient beta * (1 - exp(ref - logp)) is
        unbounded where the current policy has moved away from the token; weighted by
        w = min(pi/mu, cap) it is an importance-sampled estimate with a bounded gradient.
    """

    temperature: float = 1.0
    epsilon_low: float = 0.2
    epsilon_high: float = 0.2
    delta: float | None = None
    dual_clip: float | None = None
    beta: float = 0.0
    loss_type: str = "grpo"
    importance_sampling_level: str = "token"
    is_cap: float = 2.0
    bias_correction_kl: bool = False
    is_weight_kl: bool = False

    def __post_init__(self):
        def positive(name, value, allow_none=False):
            if value is None and allow_none:
                return
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"{name} must be a number, got {type(value).__name__}")
            if not math.isfinite(value) or value <= 0:
                raise ValueError(f"{name} must be a finite number > 0, got {value}")

        positive("temperature", self.temperature)
        lo, hi = TEMPERATURE_RANGE
        if not (lo <= self.temperature <= hi):
            # logits / tau must stay finite in fp32 for any sane logit (|x| <= 1e5 at tau = 1e-6 is 1e11)
            raise ValueError(f"temperature must lie in [{lo:g}, {hi:g}], got {self.temperature}")
        positive("is_cap", self.is_cap)
        positive("delta", self.delta, allow_none=True)
        for name in ("epsilon_low", "epsilon_high", "beta"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"{name} must be a number, got {type(value).__name__}")
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {value}")
        if self.epsilon_low >= 1:
            raise ValueError(
                f"epsilon_low must be < 1 (the clip range is [1 - eps_low, 1 + eps_high]), got {self.epsilon_low}"
            )
        if self.dual_clip is not None:
            positive("dual_clip", self.dual_clip)
            if self.dual_clip <= 1:
                raise ValueError(
                    f"dual_clip must be > 1 (it bounds the surrogate at c*A for A < 0), got {self.dual_clip}"
                )
        for name in ("bias_correction_kl", "is_weight_kl"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {type(getattr(self, name)).__name__}")
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {self.loss_type!r}")
        if self.importance_sampling_level not in IS_LEVELS:
            raise ValueError(
                f"importance_sampling_level must be one of {IS_LEVELS}, got {self.importance_sampling_level!r}"
            )

    @property
    def sequence_level(self) -> bool:
        return self.importance_sampling_level == "sequence"
