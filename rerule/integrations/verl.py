"""verl adapter: ``compute_policy_loss`` with the signature and semantics of verl's "vanilla" policy loss.

verl computes the per-token log-probs itself and calls a registered policy-loss function on them::

    pg_loss, pg_metrics = policy_loss_fn(old_log_prob, log_prob, advantages, response_mask,
                                         loss_agg_mode, config, rollout_is_weights)

This module provides that function (clipped surrogate through ``rerule.kernels.grpo_math``, one
saved [B, T] tensor instead of autograd's chain) and ``register_with_verl()`` which puts it into
verl's registry under the name "rerule" when verl is importable. verl is not a dependency.

Semantics (verl's ``compute_policy_loss_vanilla`` and ``agg_loss``, as published)::

    lr        = clamp(log_prob - old_log_prob, -20, 20);   r = exp(lr)
    pg1, pg2  = -A * r, -A * clamp(r, 1 - clip_ratio_low, 1 + clip_ratio_high)
    pg        = max(pg1, pg2);   for A < 0: pg = min(pg, -A * clip_ratio_c)   (dual clip, always on)
    pg        = pg * rollout_is_weights                   (if given; treated as constants)
    loss      = agg_loss(pg, response_mask, loss_agg_mode, **config.global_batch_info)

Aggregations (dp_size, batch_num_tokens, global_batch_size, loss_scale_factor from
``config.global_batch_info`` when present; defaults: 1, local token count, local non-empty
sequence count, T):
    token-mean               sum(pg * m) / batch_num_tokens * dp_size
    token-sum                sum(pg * m) * dp_size
    seq-mean-token-sum       sum_b [sum_t pg * m] / global_batch_size * dp_size   (empty rows excluded)
    seq-mean-token-mean      sum_b [sum_t pg * m / (n_b + 1e-8)] / global_batch_size * dp_size
    seq-mean-token-sum-norm  seq-mean-token-sum / loss_scale_factor

Metrics, as verl names them (python floats): actor/pg_clipfrac (fraction of tokens where the clipped
branch is taken), actor/ppo_kl (mean of old - new, clamped), actor/pg_clipfrac_lower (dual clip
active). Differences from verl: the math runs in fp32 whatever the input dtype; an all-masked batch
gives a zero loss where verl divides by zero.
"""

from __future__ import annotations

import numbers

import torch

from rerule.integrations._policy_math import check_same_shape, clipped_surrogate, config_get, masked_mean
from rerule.kernels.options import LossOptions

AGG_MODES = (
    "token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm",
)
LOG_RATIO_CLAMP = 20.0


def agg_loss(loss_mat, loss_mask, loss_agg_mode, dp_size=1, batch_num_tokens=None, global_batch_size=None,
             loss_scale_factor=None):
    """Reduce a [B, T] loss matrix the way verl's ``agg_loss`` does (see the module docstring)."""
    m = loss_mask.to(loss_mat.dtype)
    if loss_agg_mode in ("token-mean", "token-sum"):
        total = (loss_mat * m).sum()
        if loss_agg_mode == "token-sum":
            return total * dp_size
        n = m.sum() if batch_num_tokens is None else torch.as_tensor(batch_num_tokens, dtype=total.dtype)
        return total / n.clamp(min=1.0) * dp_size
    counts = m.sum(-1)
    nonempty = (counts > 0).to(loss_mat.dtype)
    if loss_agg_mode in ("seq-mean-token-sum", "seq-mean-token-sum-norm"):
        seq = (loss_mat * m).sum(-1)
    elif loss_agg_mode == "seq-mean-token-mean":
        seq = (loss_mat * m).sum(-1) / (counts + 1e-8)
    else:
        raise ValueError(f"loss_agg_mode must be one of {AGG_MODES}, got {loss_agg_mode!r}")
    if global_batch_size is None:
        n_seq = nonempty.sum()
    else:
        n_seq = torch.as_tensor(global_batch_size, dtype=seq.dtype)
    loss = (seq * nonempty).sum() / n_seq.clamp(min=1.0) * dp_size
    if loss_agg_mode == "seq-mean-token-sum-norm":
        loss = loss / (loss_mask.shape[-1] if loss_scale_factor is None else loss_scale_factor)
    return loss


def _clip_options(config):
    clip_ratio = config_get(config, "clip_ratio", 0.2)
    low = config_get(config, "clip_ratio_low", None)
    high = config_get(config, "clip_ratio_high", None)
    low = clip_ratio if low is None else low
    high = clip_ratio if high is None else high
    c = config_get(config, "clip_ratio_c", 3.0)
    for name, value in (("clip_ratio_low", low), ("clip_ratio_high", high), ("clip_ratio_c", c)):
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"config.{name} must be a number, got {type(value).__name__}")
    if not c > 1.0:
        raise ValueError(f"config.clip_ratio_c must be > 1 (the dual-clip bound on the ratio), got {c}")
    return LossOptions(epsilon_low=float(low), epsilon_high=float(high), dual_clip=float(c))


def _batch_info(config):
    info = dict(config_get(config, "global_batch_info", None) or {})
    out = {k: info.get(k) for k in ("dp_size", "batch_num_tokens", "global_batch_size", "loss_scale_factor")}
    if out["dp_size"] is None:
        out["dp_size"] = 1
    if out["loss_scale_factor"] is None:
        out["loss_scale_factor"] = config_get(config, "loss_scale_factor", None)
    return out


def compute_policy_loss(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    loss_agg_mode: str = "token-mean",
    config=None,
    rollout_is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """verl's vanilla PPO policy loss (clip low/high, dual clip, rollout IS weights, agg modes).

    Args:
        old_log_prob, log_prob: [B, T] log-probs of the proximal and current policy (log_prob carries
            the gradient).
        advantages: [B, T] (verl broadcasts outcome advantages over the response), or [B].
        response_mask: [B, T], nonzero = response token.
        loss_agg_mode: one of ``AGG_MODES``.
        config: verl's actor config, a dict or any object with attributes: clip_ratio (default 0.2),
            clip_ratio_low / clip_ratio_high (default clip_ratio), clip_ratio_c (default 3.0), and
            optionally global_batch_info / loss_scale_factor.
        rollout_is_weights: [B, T] or None, verl's rollout-correction weights (no gradient).

    Returns:
        (pg_loss 0-dim fp32, {"actor/pg_clipfrac", "actor/ppo_kl", "actor/pg_clipfrac_lower"}: floats).

    Example:
        >>> import torch
        >>> from rerule.integrations.verl import compute_policy_loss
        >>> lp = torch.randn(2, 5, requires_grad=True)
        >>> loss, metrics = compute_policy_loss(lp.detach(), lp, torch.randn(2, 5), torch.ones(2, 5),
        ...                                     "token-mean", {"clip_ratio": 0.2})
        >>> loss.backward()
    """
    if not isinstance(log_prob, torch.Tensor) or log_prob.dim() != 2:
        raise ValueError("log_prob must be a [B, T] tensor")
    if advantages is not None and isinstance(advantages, torch.Tensor) and advantages.dim() == 1:
        if advantages.shape[0] != log_prob.shape[0]:
            raise ValueError(
                f"advantages [B] must have B = {log_prob.shape[0]}, got {tuple(advantages.shape)}"
            )
        advantages = advantages.unsqueeze(-1).expand_as(log_prob)
    check_same_shape("log_prob", log_prob, old_log_prob=old_log_prob, advantages=advantages,
                     response_mask=response_mask, rollout_is_weights=rollout_is_weights)
    if loss_agg_mode not in AGG_MODES:
        raise ValueError(f"loss_agg_mode must be one of {AGG_MODES}, got {loss_agg_mode!r}")
    o = _clip_options(config)

    lr = (log_prob.float() - old_log_prob.detach().float()).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    pg_losses = clipped_surrogate(lr, advantages, o, weights=rollout_is_weights)
    pg_loss = agg_loss(pg_losses, response_mask, loss_agg_mode, **_batch_info(config))

    with torch.no_grad():
        lr_d, adv = lr.detach(), advantages.float()
        r = lr_d.exp()
        unclipped, clipped = adv * r, adv * r.clamp(1 - o.epsilon_low, 1 + o.epsilon_high)
        taken = torch.minimum(unclipped, clipped)
        clipfrac = masked_mean((clipped < unclipped).float(), response_mask)
        lower = masked_mean(((taken < o.dual_clip * adv) & (adv < 0)).float(), response_mask)
        ppo_kl = masked_mean(-lr_d, response_mask)
        stats = torch.stack([clipfrac, ppo_kl, lower]).tolist()
    metrics = {"actor/pg_clipfrac": stats[0], "actor/ppo_kl": stats[1], "actor/pg_clipfrac_lower": stats[2]}
    return pg_loss, metrics


def register_with_verl(name: str = "rerule") -> bool:
    """Register ``compute_policy_loss`` in verl's policy-loss registry under ``name``.

    Then select it with ``actor_rollout_ref.actor.policy_loss.loss_mode=rerule``. Returns True when
    registered, False when verl is not importable (nothing happens then).
    """
    try:
        from verl.trainer.ppo import core_algos
    except ImportError:
        return False
    core_algos.register_policy_loss(name)(compute_policy_loss)
    return True
