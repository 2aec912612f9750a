"""The peers' sides of the benchmark: TRL's loss formula and eager log-probs, TRL's and Liger's
functions behind availability checks, and the options every impl runs with.

Options (all impls): temperature 1.0, clip 0.2 / 0.3, k3 KL with beta 0.01, loss_type "grpo",
token-level ratios, old and reference log-probs given. These are RULE's settings without the dual
clip, which Liger does not have. Liger's defaults (temperature 0.9, inplace=True) are overridden.
"""

from __future__ import annotations

import functools

import torch

from rerule.kernels.options import LossOptions

OPTS = dict(temperature=1.0, epsilon_low=0.2, epsilon_high=0.3, beta=0.01, loss_type="grpo")
LOSS_OPTIONS = LossOptions(**OPTS)
GROUP_SIZE = 8
MODES = ("fwd", "fwd+bwd")


def trl_style_loss(logp, mask, adv, old, ref, o: LossOptions = LOSS_OPTIONS):
    """TRL GRPOTrainer's token-level loss from per-token log-probs (its order of operations:
    k3 KL, ratio, clipped surrogate, + beta * KL, per-sequence mean then batch mean)."""
    mask = mask.to(logp.dtype)
    old = logp.detach() if old is None else old
    coef_1 = torch.exp(logp - old)
    coef_2 = torch.clamp(coef_1, 1 - o.epsilon_low, 1 + o.epsilon_high)
    a = adv.unsqueeze(1)
    per_token = -torch.min(coef_1 * a, coef_2 * a)
    if o.beta != 0.0:
        per_token = per_token + o.beta * (torch.exp(ref - logp) - (ref - logp) - 1)
    return ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()


def eager_logps(logits, ids, temperature=1.0):
    """TRL's eager selective_log_softmax: for bf16/fp16 a log_softmax per sequence in the logits' own
    dtype (no fp32 upcast), for fp32/fp64 gather minus a per-sequence logsumexp."""
    if temperature != 1.0:
        logits = logits / temperature
    idx = ids.unsqueeze(-1)
    if logits.dtype in (torch.float32, torch.float64):
        lse = torch.stack([torch.logsumexp(row, dim=-1) for row in logits])
        return logits.gather(-1, idx).squeeze(-1) - lse
    return torch.stack([torch.log_softmax(row, -1).gather(-1, i).squeeze(-1) for row, i in zip(logits, idx)])


@functools.cache  # a failed import is retried on every call otherwise: seconds inside timed calls
def trl_logps_fn():
    """(fn(logits, ids) -> logps, where it came from) for the installed TRL, or (None, reason).

    TRL's utils module imports ``datasets``, which the GPU image lacks; there the function it would
    call on CUDA (``trl.kernels.selective_log_softmax_and_entropy``) is used directly."""
    try:
        from trl.trainer.utils import selective_log_softmax

        return (lambda x, i: selective_log_softmax(x, i)), "trl.trainer.utils.selective_log_softmax"
    except Exception as err:  # ImportError, or a broken optional dependency of trl
        first = f"{type(err).__name__}: {err}"
    if torch.cuda.is_available():
        try:
            from trl.kernels import selective_log_softmax_and_entropy

            return (lambda x, i: selective_log_softmax_and_entropy(x, i)[0]), "trl.kernels (CUDA path)"
        except Exception as err:
            first += f"; trl.kernels: {type(err).__name__}: {err}"
    return None, f"trl unavailable ({first})"


@functools.cache
def _liger(what: str):
    try:
        if what == "loss":
            from liger_kernel.transformers.grpo_loss import triton_grpo_loss as f
        elif what == "logps":
            from liger_kernel.ops.grpo_loss import fused_selective_log_softmax as f
        else:
            from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss as f
        return f, None
    except Exception as err:
        return None, f"liger-kernel unavailable ({type(err).__name__}: {err})"


def trl_on():
    return trl_logps_fn()[1] if trl_logps_fn()[0] is None else None


def liger_on(what):
    return lambda: _liger(what)[1]


def liger_ext_leaves(inp, need_grad):
    # Liger scores logits [B, T+1, V] and skips the last position (a causal LM's next-token layout).
    x = inp["logits"]
    B, T, V = x.shape
    ext = torch.empty(B, T + 1, V, dtype=x.dtype, device=x.device)
    ext[:, :T] = x
    ext[:, T] = x[:, -1]
    return {"logits_ext": ext.requires_grad_(need_grad)}


def liger_ext_grads(leaves):
    g = leaves["logits_ext"].grad
    return {"grad_logits": None if g is None else g[:, :-1]}


def trl_style_advantages(r, G=GROUP_SIZE, eps=1e-4):
    """TRL GRPOTrainer's group advantages: grouped mean and (unbiased) std, repeat_interleave."""
    grouped = r.view(-1, G)
    mean = grouped.mean(dim=1).repeat_interleave(G)
    std = grouped.std(dim=1).repeat_interleave(G)
    return (r - mean) / (std + eps)


def trl_logps(x, ids):
    return trl_logps_fn()[0](x, ids)


def liger_loss(inp, lv):
    f = _liger("loss")[0]
    o = LOSS_OPTIONS
    return f(
        lv["logits_ext"],
        inp["old"],
        inp["ref"],
        inp["ids"],
        inp["adv"],
        inp["mask"],
        temperature=o.temperature,
        beta=o.beta,
        eps_low=o.epsilon_low,
        eps_high=o.epsilon_high,
        inplace=False,
        loss_type=o.loss_type,
        reduce=True,
    )[0]


def liger_logps(inp, lv):
    return _liger("logps")[0](lv["logits_ext"], inp["ids"], OPTS["temperature"], inp["mask"])


_LIGER_MODULES: dict = {}


def liger_linear(inp, lv):
    compiled = lv["hidden"].is_cuda
    if compiled not in _LIGER_MODULES:
        o = LOSS_OPTIONS
        _LIGER_MODULES[compiled] = _liger("linear")[0](
            beta=o.beta,
            compiled=compiled,
            use_ref_model=True,
            epsilon_low=o.epsilon_low,
            epsilon_high=o.epsilon_high,
            loss_type=o.loss_type,
            temperature=o.temperature,
        )
    return _LIGER_MODULES[compiled](
        lv["hidden"],
        lv["weight"],
        inp["ids"],
        inp["mask"],
        inp["adv"],
        ref_per_token_logps=inp["ref"],
        old_per_token_logps=inp["old"],
    )[0]
