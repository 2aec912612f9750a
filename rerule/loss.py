"""Public loss API: argument checks, backend dispatch, outputs.

``grpo_loss`` computes the GRPO / ReRULE loss of docs/loss.md from logits; the math is defined by
``rerule.kernels.reference.grpo_loss_reference`` and every backend is tested against it.
"""

from __future__ import annotations

import math
import numbers
import os
from dataclasses import dataclass, field, fields, replace

import torch

from rerule.kernels.grpo_loss import fused_grpo_loss
from rerule.kernels.grpo_math import _NO_CAP, importance_weights, kernel_behavior, loss_metrics, reduction_weights
from rerule.kernels.logprobs import fused_token_logps
from rerule.kernels.options import ADV_SCALES, IS_MODES, LossOptions
from rerule.kernels.reference import group_advantages_reference

IMPLS = ("auto", "torch", "triton", "cuda")


@dataclass
class GRPOLossOutput:
    """loss: scalar (differentiable); logps / entropy: [B, T] fp32, detached, 0 where mask is 0;
    metrics: 0-dim detached tensors (clip_ratio_low, clip_ratio_high, kl, is_weight_mean,
    is_truncated_frac, is_ess), means over unmasked tokens; at sequence level clip_ratio_low /
    clip_ratio_high are means over the B sequences (one ratio each), as TRL logs them."""

    loss: torch.Tensor
    logps: torch.Tensor
    entropy: torch.Tensor | None
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)


def check_tensor(name, t, ndim=None, shape=None, floating=None, device=None, like="logits"):
    """TypeError / ValueError naming ``name`` unless ``t`` is a tensor of the given dims, shape, kind and device
    (``like`` names the tensor whose device it must share)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dims, got shape {tuple(t.shape)}")
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
    if floating is True and not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if floating is False and (t.is_floating_point() or t.is_complex()):
        raise TypeError(f"{name} must be an integer tensor, got {t.dtype}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device} but {like} are on {device}")


def group_advantages(rewards: torch.Tensor, group_size: int, scale: str = "group", eps: float = 1e-4):
    """Group-normalized advantages ``(r - mean_G(r)) / (std + eps)`` (std unbiased), [B] fp32.

    scale: "group" (std within each group), "batch" (std over the whole batch), "none" (centre only).
    Consecutive runs of ``group_size`` rewards form a group (TRL's layout).

    >>> group_advantages(torch.tensor([1.0, 0.0, 0.0, 0.0]), group_size=2)
    tensor([ 0.7070, -0.7070,  0.0000,  0.0000])
    """
    check_tensor("rewards", rewards, ndim=1, floating=True)
    if isinstance(group_size, bool) or not isinstance(group_size, numbers.Integral):
        raise TypeError(f"group_size must be an int, got {type(group_size).__name__}")
    if group_size < 2:
        raise ValueError(f"group_size must be >= 2 (a group of one has no advantage), got {group_size}")
    if rewards.numel() % group_size:
        raise ValueError(f"the batch ({rewards.numel()} rewards) is not divisible by group_size={group_size}")
    if scale not in ADV_SCALES:
        raise ValueError(f"scale must be one of {ADV_SCALES}, got {scale!r}")
    if not (eps > 0):
        raise ValueError(f"eps must be > 0, got {eps}")
    if not torch.isfinite(rewards).all():
        raise ValueError("rewards contain NaN or inf")
    return group_advantages_reference(rewards, group_size, scale, eps).to(torch.float32)


def _resolve_impl(impl: str, device: torch.device) -> str:
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl != "auto":
        if impl == "triton" and device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError(
                "impl='triton' on CPU tensors runs the Triton interpreter, which is off: set "
                "TRITON_INTERPRET=1 before importing triton, or use impl='torch' / 'auto'."
            )
        return impl
    if device.type == "cuda":
        try:
            import triton  # noqa: F401
        except ImportError:
            return "torch"
        return "triton"
    return "torch"


def _canonical(name, t, B, T, device, valid, like="logits"):
    if t is None:
        return None
    check_tensor(name, t, shape=(B, T), floating=True, device=device, like=like)
    t = t.to(torch.float32)
    return torch.where(valid, t, torch.zeros_like(t)).contiguous()


def _check_logits(logits):
    check_tensor("logits", logits, ndim=3, floating=True)
    if logits.shape[-1] == 0:
        raise ValueError("logits have an empty vocab dimension")
    return logits.shape


def _check_ids(completion_ids, completion_mask, B, T, V, device, like="logits"):
    """Checked (ids int64 [B, T], valid bool [B, T])."""
    check_tensor("completion_ids", completion_ids, shape=(B, T), floating=False, device=device, like=like)
    if completion_ids.dtype == torch.bool:
        raise TypeError("completion_ids must be an integer tensor of token ids, got torch.bool")
    if completion_mask is None:
        completion_mask = torch.ones(B, T, dtype=torch.int32, device=device)
    check_tensor("completion_mask", completion_mask, shape=(B, T), device=device, like=like)
    if completion_mask.is_complex():
        raise TypeError(f"completion_mask must be a bool, integer or float tensor of 0/1, got {completion_mask.dtype}")
    # Binary only: a token is in the loss or not. A fractional weight (or a NaN) would otherwise be
    # silently treated as 1 by the kernels; token weights belong in the advantages or the loss type.
    if completion_mask.dtype != torch.bool and bool(((completion_mask != 0) & (completion_mask != 1)).any()):
        bad = completion_mask[(completion_mask != 0) & (completion_mask != 1)][0].item()
        raise ValueError(f"completion_mask must hold only 0 and 1 (1 = a real token), found {bad}")
    valid = completion_mask != 0
    ids = completion_ids.to(torch.int64)
    if ids.numel() and bool(((ids < 0) | (ids >= V)).any()):
        bad = ids[(ids < 0) | (ids >= V)][0].item()
        raise ValueError(f"completion_ids must lie in [0, {V}) (the vocab of {like}), found {bad}")
    return ids.contiguous(), valid


def grpo_loss(
    logits: torch.Tensor,
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor | None = None,
    advantages: torch.Tensor | None = None,
    *,
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
    inplace: bool = False,
    impl: str = "auto",
) -> GRPOLossOutput:
    """The fused GRPO loss (docs/loss.md) over completion logits.

    Args:
        logits: [B, T, V], any float dtype (math is fp32); row t scores completion token t.
            A view such as TRL's ``logits[:, :-1]`` works as long as V is the contiguous dim.
        completion_ids: [B, T] integer ids in [0, V).
        completion_mask: [B, T] of 0/1 (or bool), 1 = real token (default: all ones). Anything else (a
            fractional weight, a NaN) is a ValueError: per-token weights are not part of the loss.
        advantages: [B]; or pass ``rewards`` [B] and ``group_size`` to compute them here
            (``group_advantages(rewards, group_size, scale_rewards)``).
        old_logps: [B, T] log-probs of the proximal policy; None = detached current (ratio 1).
            old/behavior/ref log-probs are constants of the loss: one that requires grad is a ValueError.
        behavior_logps: [B, T] log-probs of the policy that sampled the tokens (a replay buffer's
            behavior policy, or vLLM's sampling log-probs); gives the detached weight w on the
            policy term, by default w = min(exp(old - behavior), is_cap).
        is_mode: how w is formed from behavior_logps, TRL's ``vllm_importance_sampling_mode``:
            "token_truncate" (default) w_t = clamp(exp(old_t - beh_t), is_cap_min, is_cap);
            "token_mask" w_t = exp(old_t - beh_t), or 0 outside [is_cap_min, is_cap];
            "sequence_truncate" / "sequence_mask": one ratio per sequence,
            exp(sum_t (old_t - beh_t)) over the unmasked tokens, truncated / masked the same way
            and applied to every token of the sequence. Any mode but the default, and is_cap_min,
            need old_logps.
        is_cap_min: lower bound of the importance ratio (TRL's vllm_importance_sampling_clip_min);
            None: no lower bound.
        is_ratio: a ready importance weight instead of behavior_logps: [B, T] per token, or [B] /
            [B, 1] per sequence (TRL's ``importance_sampling_ratio``), >= 0, used as given (no
            cap); needs old_logps.
        bias_correction_kl: multiply the KL term by the unclipped policy ratio (TRL's
            use_bias_correction_kl, DeepSeek-V3.2's unbiased reverse-KL gradient).
        is_weight_kl: let w also weigh the KL term (for replayed off-policy tokens, whose k3
            gradient is unbounded where the current policy moved away from the token).
        ref_logps: [B, T] reference log-probs for the k3 KL (needed when beta > 0); <= 0 where the mask is 1.
        temperature, epsilon_low, epsilon_high, delta, dual_clip, beta, loss_type,
        importance_sampling_level, is_cap: see ``LossOptions``.
        max_completion_length: dr_grpo's normalizer length (default T).
        num_items_in_batch: dapo's normalizer (global token count; default the mask sum).
        gradient_accumulation_steps, steps_per_generation, num_processes: TRL's gradient-accumulation
            convention. grpo / bnpo / dr_grpo losses are divided by gradient_accumulation_steps; dapo's
            normalizer becomes num_items_in_batch / num_processes * gradient_accumulation_steps /
            steps_per_generation (num_items_in_batch spanning a generation batch of all processes;
            steps_per_generation defaults to gradient_accumulation_steps). Folded into the reduction
            weights: no extra pass over the gradient.
        return_entropy: also return per-token entropies.
        inplace: write the gradient into the logits buffer (saves one [B, T, V] buffer; the
            caller's logits are overwritten when a gradient is needed). Bad logits are then caught by an
            extra read before anything is overwritten.
        impl: "auto" (Triton on CUDA, torch on CPU), "triton", "torch" or "cuda".

    Returns:
        GRPOLossOutput(loss, logps, entropy, metrics).

    Example:
        >>> import torch
        >>> from rerule import grpo_loss
        >>> logits = torch.randn(4, 7, 50, requires_grad=True)
        >>> ids = torch.randint(0, 50, (4, 7))
        >>> out = grpo_loss(logits, ids, torch.ones(4, 7), rewards=torch.tensor([1., 0., 1., 1.]), group_size=2)
        >>> out.loss.backward()
        >>> out.logps.shape
        torch.Size([4, 7])
    """
    B, T, V = _check_logits(logits)
    args = {name: value for name, value in locals().items() if name in LOSS_ARGUMENTS}
    c = check_loss_inputs((B, T, V), logits.device, completion_ids, completion_mask, advantages, args)
    if inplace and logits.stride(-1) != 1:
        raise ValueError("inplace=True needs logits with a contiguous vocab dimension")
    x = logits if logits.stride(-1) == 1 else logits.contiguous()
    if inplace and logits.requires_grad and torch.is_grad_enabled():
        # everything that can fail after the kernel is checked before it overwrites the logits
        _check_finite(torch.zeros(B, T, device=logits.device), c.valid, c.advantages, c.old, c.behavior, c.ref)
        _check_logits_before_overwrite(x, c.ids, c.valid)

    loss, logp, ent = fused_grpo_loss(
        x, c.ids, c.mask, c.advantages, c.old, c.behavior, c.ref, c.options, c.impl, c.reduction, return_entropy,
        inplace,
    )
    return loss_output(c, loss, logp, ent)


# The keyword arguments that grpo_loss and fused_linear_grpo_loss share, checked by check_loss_inputs.
LOSS_ARGUMENTS = (
    "rewards", "group_size", "old_logps", "behavior_logps", "ref_logps", "temperature", "epsilon_low",
    "epsilon_high", "delta", "dual_clip", "beta", "loss_type", "importance_sampling_level", "is_cap", "is_mode",
    "is_cap_min", "is_ratio", "bias_correction_kl", "is_weight_kl", "max_completion_length", "num_items_in_batch",
    "gradient_accumulation_steps", "steps_per_generation", "num_processes", "scale_rewards", "impl",
)
_OPTION_NAMES = tuple(f.name for f in fields(LossOptions))


@dataclass(frozen=True)
class LossInputs:
    """The checked inputs of one loss call, what the backends take (built by ``check_loss_inputs``).

    options: the LossOptions, validated once (is_cap lifted when a non-default importance mode's weight was
    computed here); impl: the resolved backend; ids int64 [B, T]; valid bool [B, T]; mask int32 [B, T];
    advantages fp32 [B]; old / behavior / ref fp32 [B, T] (0 where the mask is 0) or None, behavior in the
    kernels' form old - log(w) when the weight was computed here; weights: that (w, outside) or None;
    reduction: [B, T] fp32 weights with loss = sum(reduction * loss_tok), the loss type's normalizer times the
    gradient-accumulation factor: all that the kernels need of loss_type, max_completion_length,
    num_items_in_batch and the accumulation arguments; not_finite: what a non-finite log-prob is blamed on.
    """

    options: LossOptions
    impl: str
    ids: torch.Tensor
    valid: torch.Tensor
    mask: torch.Tensor
    advantages: torch.Tensor
    old: torch.Tensor | None
    behavior: torch.Tensor | None
    ref: torch.Tensor | None
    weights: tuple[torch.Tensor, torch.Tensor] | None
    reduction: torch.Tensor
    not_finite: str


def check_loss_inputs(
    shape, device, completion_ids, completion_mask, advantages, args: dict, like="logits", not_finite=None
) -> LossInputs:
    """The argument checks of ``grpo_loss`` and ``fused_linear_grpo_loss``, written once.

    shape: (B, T, V) of the logits the call scores (V from the logits or the lm_head weight); device: theirs;
    args: the call's ``LOSS_ARGUMENTS`` by name; like: the name of the tensor the others must match in error
    messages; not_finite: what a non-finite log-prob after the kernel is blamed on.
    """
    B, T, V = shape
    ids, valid = _check_ids(completion_ids, completion_mask, B, T, V, device, like=like)
    o = LossOptions(**{name: args[name] for name in _OPTION_NAMES})
    impl = _resolve_impl(args["impl"], device)
    adv, old, behavior, ref = _loss_inputs(
        B, T, device, valid, advantages, args["rewards"], args["group_size"], args["scale_rewards"],
        args["old_logps"], args["behavior_logps"], args["ref_logps"], o.beta, args["max_completion_length"],
        args["num_items_in_batch"], like=like,
    )
    o, behavior, weights = _importance_inputs(
        o, B, T, device, valid, old, behavior, args["is_mode"], args["is_cap_min"], args["is_ratio"], like=like
    )
    scale = accumulation_scale(
        o.loss_type, args["gradient_accumulation_steps"], args["steps_per_generation"], args["num_processes"]
    )
    mask = valid.to(torch.int32).contiguous()
    rw = reduction_weights(mask, o.loss_type, args["max_completion_length"], args["num_items_in_batch"])
    if scale != 1.0:
        rw = rw * scale
    return LossInputs(
        options=o, impl=impl, ids=ids, valid=valid, mask=mask, advantages=adv, old=old, behavior=behavior, ref=ref,
        weights=weights, reduction=rw, not_finite=not_finite or _LOGITS_NOT_FINITE,
    )


def loss_output(c: LossInputs, loss, logp, ent) -> GRPOLossOutput:
    """The checks after the kernel (a non-finite log-prob where the mask is 1) and the metrics, written once."""
    _check_finite(logp, c.valid, c.advantages, c.old, c.behavior, c.ref, source=c.not_finite)
    metrics = loss_metrics(
        logp, c.mask, c.advantages, c.options, old=c.old, behavior=c.behavior, ref=c.ref, weights=c.weights
    )
    if ent is not None:
        metrics["entropy"] = (ent * c.mask).sum() / c.mask.sum().clamp(min=1)
    return GRPOLossOutput(loss=loss, logps=logp, entropy=ent, metrics=metrics)


def _loss_inputs(B, T, device, valid, advantages, rewards, group_size, scale_rewards, old_logps, behavior_logps,
                 ref_logps, beta, max_completion_length, num_items_in_batch, like="logits"):
    """Checked advantages fp32 [B] and canonical old/behavior/ref log-probs (fp32 [B, T], masked positions 0, or
    None)."""
    if (advantages is None) == (rewards is None):
        raise ValueError("pass exactly one of advantages=[B] or rewards=[B] (with group_size)")
    if rewards is not None:
        if group_size is None:
            raise ValueError("rewards= needs group_size=")
        check_tensor("rewards", rewards, shape=(B,), device=device, like=like)
        adv = group_advantages(rewards, group_size, scale_rewards)
    else:
        if group_size is not None:
            raise ValueError("group_size is only used with rewards=, not with advantages=")
        check_tensor("advantages", advantages, shape=(B,), floating=True, device=device, like=like)
        adv = advantages.to(torch.float32)
    adv = adv.detach().contiguous()
    if beta > 0 and ref_logps is None:
        raise ValueError("beta > 0 needs ref_logps (the reference policy's [B, T] log-probs)")
    if max_completion_length is not None:
        if isinstance(max_completion_length, bool) or not isinstance(max_completion_length, numbers.Integral):
            raise TypeError("max_completion_length must be an int")
        if max_completion_length < T:
            raise ValueError(f"max_completion_length={max_completion_length} is shorter than T={T}")
    if num_items_in_batch is not None:
        if isinstance(num_items_in_batch, torch.Tensor) and num_items_in_batch.numel() != 1:
            raise ValueError(
                "num_items_in_batch must be a number or a one-element tensor (the global token count), got a "
                f"tensor of shape {tuple(num_items_in_batch.shape)}"
            )
        if isinstance(num_items_in_batch, bool) or not isinstance(num_items_in_batch, (numbers.Real, torch.Tensor)):
            raise TypeError(f"num_items_in_batch must be a number, got {type(num_items_in_batch).__name__}")
        if not (float(num_items_in_batch) > 0):
            raise ValueError(f"num_items_in_batch must be > 0, got {num_items_in_batch}")
    for name, t in (("old_logps", old_logps), ("behavior_logps", behavior_logps), ("ref_logps", ref_logps)):
        if isinstance(t, torch.Tensor) and t.requires_grad:
            # the loss treats these as constants: a gradient would silently never reach them
            raise ValueError(f"{name} requires grad, but the loss treats it as a constant: pass {name}.detach()")
    old = _canonical("old_logps", old_logps, B, T, device, valid, like)
    behavior = _canonical("behavior_logps", behavior_logps, B, T, device, valid, like)
    ref = _canonical("ref_logps", ref_logps, B, T, device, valid, like)
    return adv, old, behavior, ref


def _positive_int(name, value):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")


def accumulation_scale(loss_type, gradient_accumulation_steps=1, steps_per_generation=None, num_processes=1):
    """The factor TRL's gradient-accumulation convention puts on the loss: 1 / gradient_accumulation_steps
    for grpo / bnpo / dr_grpo; steps_per_generation * num_processes / gradient_accumulation_steps for dapo
    (whose normalizer num_items_in_batch spans a generation batch over all processes)."""
    _positive_int("gradient_accumulation_steps", gradient_accumulation_steps)
    _positive_int("num_processes", num_processes)
    if steps_per_generation is None:
        steps_per_generation = gradient_accumulation_steps
    _positive_int("steps_per_generation", steps_per_generation)
    if loss_type == "dapo":
        return steps_per_generation * num_processes / gradient_accumulation_steps
    return 1.0 / gradient_accumulation_steps


def _importance_inputs(o, B, T, device, valid, old, behavior, is_mode, is_cap_min, is_ratio, like="logits"):
    """(options, kernel behavior log-probs, (w, outside) or None).

    The default (token_truncate, no lower bound, no ratio) stays in the kernels as w = min(exp(old - behavior),
    is_cap). Every other mode's weight is computed here once, O(B*T), and handed to the kernels as
    behavior log-probs old - log(w) with no cap."""
    if is_mode not in IS_MODES:
        raise ValueError(f"is_mode must be one of {IS_MODES}, got {is_mode!r}")
    if is_cap_min is not None:
        if isinstance(is_cap_min, bool) or not isinstance(is_cap_min, numbers.Real):
            raise TypeError(f"is_cap_min must be a number or None, got {type(is_cap_min).__name__}")
        if not (math.isfinite(is_cap_min) and 0 <= is_cap_min <= o.is_cap):
            raise ValueError(f"is_cap_min must lie in [0, is_cap={o.is_cap}], got {is_cap_min}")
    if is_ratio is not None:
        if behavior is not None:
            raise ValueError("pass at most one of behavior_logps and is_ratio")
        check_tensor("is_ratio", is_ratio, floating=True, device=device, like=like)
        if tuple(is_ratio.shape) not in ((B, T), (B, 1), (B,)):
            raise ValueError(f"is_ratio must have shape ({B}, {T}), ({B}, 1) or ({B},), got {tuple(is_ratio.shape)}")
        r = is_ratio.detach().to(torch.float32).reshape(B, -1).expand(B, T)
        if not bool(torch.where(valid, torch.isfinite(r) & (r >= 0), True).all()):
            raise ValueError("is_ratio must be finite and >= 0 where completion_mask is 1")
    elif behavior is None or (is_mode == "token_truncate" and is_cap_min is None):
        return o, behavior, None
    if old is None:
        raise ValueError(
            f"is_ratio / is_mode={is_mode!r} / is_cap_min need old_logps (the weight is computed before the "
            "kernel; only the default token_truncate weight can use the current log-probs as old)"
        )
    w, outside = importance_weights(valid, old, behavior, is_mode, o.is_cap, is_cap_min, ratio=is_ratio)
    return replace(o, is_cap=_NO_CAP), kernel_behavior(old, w), (w, outside)


_LOGITS_NOT_FINITE = "logits (a NaN/+inf entry, or -inf on a selected completion token)"


def _check_finite(logp, valid, adv, old, behavior, ref, source=_LOGITS_NOT_FINITE):
    # One host sync for all checks: a NaN or +inf logit, or a -inf logit on a chosen token, shows up
    # in logp; the optional log-prob inputs are checked where the mask is 1.
    names = [source, "advantages"]
    # where(), not boolean indexing: no extra host sync for the nonzero count
    checks = [torch.isfinite(torch.where(valid, logp, 0.0)).all(), torch.isfinite(adv).all()]
    for name, t in (("old_logps", old), ("behavior_logps", behavior), ("ref_logps", ref)):
        if t is not None:
            names.append(name)
            checks.append(torch.isfinite(torch.where(valid, t, 0.0)).all())
    if ref is not None:
        checks.append((torch.where(valid, ref, 0.0) <= 0).all())
    ok = torch.stack(checks).cpu()
    if not bool(ok.all()):
        bad = [n for n, good in zip(names, ok.tolist()) if not good]
        if bad:
            raise ValueError(f"non-finite values where completion_mask is 1 in: {', '.join(bad)}")
        raise ValueError("ref_logps must be log-probabilities (<= 0) where completion_mask is 1, found a value > 0")


def _check_logits_before_overwrite(x, ids, valid):
    """inplace=True overwrites the logits with the gradient, so bad logits must be caught before: a NaN or
    +inf logit in a row with mask 1, or -inf on the selected token (one extra read of the logits)."""
    row_max = x.amax(dim=-1)  # NaN propagates through amax, +inf is the max
    chosen = x.gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    bad = valid & (row_max.isnan() | row_max.isposinf() | ~torch.isfinite(chosen))
    if bool(bad.any()):
        raise ValueError(
            f"non-finite values where completion_mask is 1 in: {_LOGITS_NOT_FINITE} (checked before inplace=True "
            "overwrote anything)"
        )


def token_logps(
    logits: torch.Tensor,
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor | None = None,
    temperature: float = 1.0,
    return_entropy: bool = False,
    impl: str = "auto",
):
    """Per-token log-probs of ``completion_ids`` under ``logits / temperature``, fused.

    Returns (logps [B, T] fp32, differentiable w.r.t. logits; entropy [B, T] or None, detached).
    Positions with mask 0 give 0 and get no gradient.
    """
    B, T, V = _check_logits(logits)
    ids, valid = _check_ids(completion_ids, completion_mask, B, T, V, logits.device)
    LossOptions(temperature=temperature)
    impl = _resolve_impl(impl, logits.device)
    x = logits if logits.stride(-1) == 1 else logits.contiguous()
    return fused_token_logps(x, ids, valid.to(torch.int32).contiguous(), temperature, return_entropy, impl)
