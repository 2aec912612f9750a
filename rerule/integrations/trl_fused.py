"""TRL adapter: ``FusedGRPOTrainer`` runs TRL's GRPO loss through rerule's fused-linear kernel.

``FusedGRPOTrainer`` is TRL's ``GRPOTrainer`` with one method replaced, ``_compute_loss``: the model's
backbone gives the last hidden states, and ``rerule.fused_linear_grpo_loss`` takes them with the
lm_head weight, so the completion logits are only ever held one row chunk at a time. Generation,
rewards, advantages, logging and the optimizer loop are TRL's own. ``ReplayGRPOTrainer`` (in
``rerule.integrations.trl_replay``; both re-exported by ``rerule.integrations.trl``) adds ReRULE's
hard-case replay on top.

How TRL's inputs map onto the kernel (tests/integrations/test_integration_trl.py checks loss and every parameter's
gradient against TRL's native ``_compute_loss`` for grpo / bnpo / dr_grpo / dapo x beta x level x
plain or bias-corrected KL):

- loss mask = completion_mask * tool_mask (when present); advantages [B]; old / ref per-token
  log-probs as given (old absent: ratio 1 with the gradient of the current log-probs, as TRL).
- TRL's vLLM correction ``importance_sampling_ratio`` (all four ``vllm_importance_sampling_mode`` values:
  token [B, T] or sequence [B, 1] = exp of the summed old - sampling log-prob differences, truncated or
  masked to [clip_min, clip_max]; it multiplies the policy term only) is passed as the kernel's
  ``is_ratio``, used as given. The same modes are available without TRL as ``grpo_loss(...,
  behavior_logps=sampling_logps, is_mode=..., is_cap=clip_max, is_cap_min=clip_min)``.
- normalizers: TRL's grpo / bnpo as the kernel's own; dr_grpo as a token sum over B * max_completion_length;
  dapo over num_items_in_batch / num_processes * grad_accum / steps_per_generation; grpo / bnpo / dr_grpo
  divided by the gradient-accumulation steps: all folded into the kernel's reduction weights
  (``gradient_accumulation_steps`` / ``steps_per_generation`` / ``num_processes`` of the loss API).
- ``use_bias_correction_kl`` (TRL's default True) becomes ``bias_correction_kl``: the k3 KL times the
  unclipped, differentiable ratio exp(log_ratio) (token: exp(logp - old); sequence: exp of the masked
  mean, broadcast over the tokens), as TRL. The vLLM ratio stays on the policy term only, as in TRL.
- metrics: TRL's names and formulas (kl, entropy, clip_ratio/low_mean, high_mean, region_mean,
  low_min, high_max), computed from the kernel's per-token log-probs and entropies; ``kl`` is the
  corrected KL when the correction is on, which is what TRL logs.

Precision: the kernel's math is fp32 (logits are never rounded); TRL keeps log-probs in the model
dtype. In bf16 the two differ by bf16 rounding, so the parity tests run the tiny model in fp32.
Under mixed precision the hidden states are cast to the lm_head weight's dtype for the GEMM.

Not supported (a ValueError says so): loss types cispo / sapo / luspo / vespo, top_entropy_quantile
< 1, off_policy_mask_threshold, the entropy bonus, MoE aux loss, final-logit softcapping,
multimodal inputs, per-token advantages.
"""

from __future__ import annotations

import functools
import types

import torch
from accelerate.utils import is_peft_model
from trl import GRPOTrainer
from trl.trainer.utils import nanmax, nanmin

try:  # TRL >= 1.16 (DeepSpeed ZeRO-3 gathering of the lm head for fused losses)
    from trl.trainer.utils import maybe_gather_lm_head_ctx
except ImportError:  # pragma: no cover - older TRL
    from contextlib import nullcontext as _nullcontext

    def maybe_gather_lm_head_ctx(*params):
        return _nullcontext()

from rerule import fused_linear_grpo_loss

SUPPORTED_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
_MULTIMODAL_KEYS = ("pixel_values", "image_grid_thw", "pixel_attention_mask", "image_sizes", "num_images")


def install_head_hook(model) -> None:
    """Let ``model(..., rerule_head=fn)`` run the backbone only and return ``fn(hidden, weight, bias)``.

    The loss runs inside the model's forward (like TRL's own fused lm-head), so DDP/FSDP wrappers and
    DeepSpeed's parameter gathering see a normal forward call. Without ``rerule_head`` the forward is
    the one the model had (TRL's patched forward included), so generation is unchanged.
    """
    if getattr(model, "_rerule_head_hook", False):
        return
    inner = model.forward

    @functools.wraps(type(model).forward)
    def forward(self, *args, rerule_head=None, **kwargs):
        if rerule_head is None:
            return inner(*args, **kwargs)
        kwargs["use_cache"] = False
        hidden = self.base_model(*args, **kwargs).last_hidden_state
        head = self.get_output_embeddings()
        weight, bias = head.weight, head.bias
        if hasattr(weight, "full_tensor"):  # FSDP2 DTensor: gather the (usually small) head once
            weight = weight.full_tensor()
            bias = None if bias is None else bias.full_tensor()
        with maybe_gather_lm_head_ctx(weight, bias):
            return rerule_head(hidden.to(weight.device), weight, bias)

    model.forward = types.MethodType(forward, model)
    model._rerule_head_hook = True


def logit_scale_of(config) -> float:
    """The multiplier some architectures apply to the logits (TRL reads the same config fields)."""
    cfg = config.get_text_config()
    if getattr(cfg, "final_logit_softcapping", None) is not None:
        raise ValueError(
            "final_logit_softcapping is not supported by the rerule kernel (Gemma-2 style models)"
        )
    scale = getattr(cfg, "logit_scale", None)
    if scale is None:
        scale = getattr(cfg, "output_multiplier", None)
    if scale is None:
        scale = getattr(cfg, "lm_head_multiplier", None)
    if scale is None and getattr(cfg, "logits_scaling", None) is not None:
        scale = cfg.logits_scaling if cfg.model_type == "hyperclovax" else 1 / cfg.logits_scaling
    scale = 1.0 if scale is None else float(scale)
    if not scale > 0:
        raise ValueError(f"a logit scale of {scale} cannot be folded into the temperature")
    return scale


class FusedGRPOTrainer(GRPOTrainer):
    """TRL's ``GRPOTrainer`` with the loss computed by ``rerule.fused_linear_grpo_loss``.

    Takes every argument ``GRPOTrainer`` takes, plus:
        rerule_chunk_size: valid tokens per lm-head GEMM chunk (None: the kernel's default).
        rerule_impl: "auto" | "torch" | "triton" | "cuda", the kernel backend.

    Example::

        trainer = FusedGRPOTrainer(model="Qwen/Qwen2.5-0.5B-Instruct", reward_funcs=my_reward,
                                   args=GRPOConfig(output_dir="out", loss_type="dapo"), train_dataset=ds)
        trainer.train()
    """

    def __init__(self, *args, rerule_chunk_size: int | None = None, rerule_impl: str = "auto", **kwargs):
        super().__init__(*args, **kwargs)
        self.rerule_chunk_size = rerule_chunk_size
        self.rerule_impl = rerule_impl
        self._rerule_logit_scale = logit_scale_of(self.model.config)
        install_head_hook(self.model.get_base_model() if is_peft_model(self.model) else self.model)
        self._check_supported({})

    def _check_supported(self, inputs) -> None:
        # getattr defaults: attributes that older TRL releases do not have mean the feature is off.
        opt = lambda name, default: getattr(self, name, default)
        unsupported = []
        if self.loss_type not in SUPPORTED_LOSS_TYPES:
            unsupported.append(f"loss_type={self.loss_type!r} (supported: {SUPPORTED_LOSS_TYPES})")
        if opt("top_entropy_quantile", 1.0) < 1.0:
            unsupported.append("top_entropy_quantile < 1")
        if opt("off_policy_mask_threshold", None) is not None:
            unsupported.append("off_policy_mask_threshold")
        if opt("_entropy_bonus_enabled", False):
            unsupported.append("entropy_coef / use_adaptive_entropy")
        if opt("aux_loss_enabled", False):
            unsupported.append("the MoE router aux loss")
        if any(inputs.get(k) is not None for k in _MULTIMODAL_KEYS):
            unsupported.append("multimodal inputs")
        if inputs.get("advantages") is not None and inputs["advantages"].dim() != 1:
            unsupported.append("per-token advantages [B, T]")
        if unsupported:
            raise ValueError("FusedGRPOTrainer does not support: " + "; ".join(unsupported))

    def _rerule_loss_spec(self, inputs, mask, mode, behavior_logps=None, is_cap=None, num_items=None):
        """(kwargs for fused_linear_grpo_loss, divisor) so that loss / divisor is TRL's loss for ``inputs``;
        the divisor is 1 (TRL's normalizers go to the kernel's reduction weights), kept for callers.

        behavior_logps / is_cap replace TRL's vLLM ratio (the replay trainer's w = min(pi_old / mu, cap));
        num_items replaces ``inputs["num_items_in_batch"]`` as dapo's token count.
        """
        B = mask.size(0)
        gas = self.current_gradient_accumulation_steps if mode == "train" else 1
        old = inputs.get("old_per_token_logps")
        kw = dict(
            old_logps=old,
            ref_logps=inputs.get("ref_per_token_logps") if self.beta != 0.0 else None,
            temperature=self.temperature / self._rerule_logit_scale,
            epsilon_low=self.epsilon_low,
            epsilon_high=self.epsilon_high,
            delta=self.args.delta,
            beta=self.beta,
            # getattr default: TRL releases before the option had only the plain k3 KL
            bias_correction_kl=bool(getattr(self.args, "use_bias_correction_kl", False)),
            importance_sampling_level=self.importance_sampling_level,
            return_entropy=True,
            chunk_size=self.rerule_chunk_size,
            impl=self.rerule_impl,
        )
        if behavior_logps is not None:
            kw.update(behavior_logps=behavior_logps, is_cap=is_cap)
        elif self.use_vllm and self.vllm_importance_sampling_correction:
            if old is None:
                raise ValueError(
                    "importance_sampling_ratio needs old_per_token_logps (TRL always computes them with vLLM)"
                )
            # TRL's ratio as computed at generation ([B, T] token modes, [B, 1] sequence modes), used as given
            kw["is_ratio"] = inputs["importance_sampling_ratio"]
        # TRL's normalizers and gradient-accumulation convention, folded into the kernel's reduction weights
        if self.loss_type == "dapo":
            items = inputs["num_items_in_batch"] if num_items is None else num_items
            kw.update(loss_type="dapo", num_items_in_batch=items, num_processes=self.accelerator.num_processes)
            if mode == "train":
                kw.update(gradient_accumulation_steps=gas, steps_per_generation=self.args.steps_per_generation)
        elif self.loss_type == "dr_grpo":
            # sum / (B * max_completion_length): a token sum over a fixed count (C may exceed the maximum
            # when TRL pads to a multiple), divided by the accumulation steps
            kw.update(loss_type="dapo", num_items_in_batch=float(B * self.max_completion_length),
                      gradient_accumulation_steps=gas, steps_per_generation=1)
        else:  # grpo, bnpo: the kernel's own normalizers equal TRL's
            kw.update(loss_type=self.loss_type, gradient_accumulation_steps=gas)
        return kw, 1

    def _rerule_forward(self, model, inputs, head):
        """Run the backbone on prompt + completion and call ``head(h, weight, bias)`` on the hidden
        states h [B, C, H] that score the C completion tokens."""
        completion_ids = inputs["completion_ids"]
        C = completion_ids.size(1)
        input_ids = torch.cat([inputs["prompt_ids"], completion_ids], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
        cast_fp32 = self.args.cast_lm_head_to_fp32

        def on_hidden(hidden, weight, bias):
            # Position t scores token t + 1, so the completion is scored by positions P - 1 .. P + C - 2.
            h = hidden[:, -C - 1 : -1]
            h = h.float() if cast_fp32 else h.to(weight.dtype)
            return head(h, weight, bias)

        with self.accelerator.autocast():
            return model(input_ids=input_ids, attention_mask=attention_mask, rerule_head=on_hidden)

    def _compute_loss(self, model, inputs):
        self._check_supported(inputs)
        mode = "train" if self.model.training else "eval"
        mask = inputs["completion_mask"]
        if "tool_mask" in inputs:
            mask = mask * inputs["tool_mask"]
        kw, divisor = self._rerule_loss_spec(inputs, mask, mode)
        completion_ids, advantages = inputs["completion_ids"], inputs["advantages"]

        def head(h, weight, bias):
            return fused_linear_grpo_loss(h, weight, completion_ids, mask, advantages, bias=bias, **kw)

        out = self._rerule_forward(model, inputs, head)
        self._log_trl_metrics(mode, out, inputs, mask)
        return out.loss / divisor

    @torch.no_grad()
    def _log_trl_metrics(self, mode, out, inputs, mask, prefix=""):
        logps = out.logps
        m = mask.to(logps.dtype)
        old = inputs.get("old_per_token_logps")
        log_ratio = logps - (logps if old is None else old.float())
        if self.importance_sampling_level == "sequence":
            log_ratio = ((log_ratio * m).sum(-1) / m.sum(-1).clamp(min=1.0)).unsqueeze(-1)
        coef = torch.exp(log_ratio)
        # TRL multiplies its logged KL by the ratio before delta clamps it
        kl_coef = coef if getattr(self.args, "use_bias_correction_kl", False) else 1.0
        if self.args.delta is not None:
            coef = coef.clamp(max=self.args.delta)
        adv = inputs["advantages"].float().unsqueeze(1)

        def seq_mean(x):
            return x.squeeze(1) if x.shape[1] == 1 else (x * m).sum(-1) / m.sum(-1)

        def global_mean(x):
            if x.shape[1] == 1:
                local = torch.stack([x.sum(), torch.tensor(float(x.shape[0]), device=x.device)])
            else:
                local = torch.stack([(x * m).sum(), m.sum()])
            totals = self.accelerator.reduce(local, reduction="sum")
            return (totals[0] / totals[1].clamp(min=1.0)).item()

        metrics = self._metrics[mode]
        if self.beta != 0.0:
            ref = inputs["ref_per_token_logps"].float()
            metrics[prefix + "kl"].append(global_mean((torch.exp(ref - logps) - (ref - logps) - 1) * kl_coef))
        metrics[prefix + "entropy"].append(global_mean(out.entropy))
        low = ((coef < 1 - self.epsilon_low) & (adv < 0)).float()
        high = ((coef > 1 + self.epsilon_high) & (adv > 0)).float()
        metrics[prefix + "clip_ratio/low_mean"].append(global_mean(low))
        metrics[prefix + "clip_ratio/high_mean"].append(global_mean(high))
        metrics[prefix + "clip_ratio/region_mean"].append(global_mean(torch.maximum(low, high)))
        metrics[prefix + "clip_ratio/low_min"].append(nanmin(self.accelerator.gather(seq_mean(low))).item())
        metrics[prefix + "clip_ratio/high_max"].append(nanmax(self.accelerator.gather(seq_mean(high))).item())


__all__ = ["FusedGRPOTrainer", "install_head_hook", "logit_scale_of"]
