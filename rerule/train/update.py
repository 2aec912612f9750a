"""The policy update of a ReRULE step: replayed-group advantages and weights, the micro-batched
update of fresh + replayed groups, the collation of replayed groups. (Stage 0 is ``warm_start.py``.)

The update, for fresh groups F and replayed groups R (docs/replay.md)::

    loss = L_on(F) + lambda * L_replay(R)

- Fresh tokens were sampled by the current policy and get one update, so old = current (ratio 1)
  and there is no behavior weight: plain RULE.
- Replayed tokens: pi_old is a forward of the *current* policy on the stored tokens, so the PPO
  clip is taken against the current policy (old = current, detached), and the tokens carry the
  truncated, detached weight w = min(pi_old / mu, cap) against the stored behavior log-probs mu.
  Plain PPO-clip with mu as "old" would clip most replayed tokens to zero gradient. In
  ``grpo_loss`` terms: ``old_logps=None, behavior_logps=mu, is_cap=cap``.
- Replayed groups use the consistent estimator by default (``replay_weights``, docs/replay.md):
  per group, sequence-level truncated ratios rho_i = min(pi(y_i) / mu(y_i), cap), self-normalized
  to p_i, give both the baseline and std of the advantages and the row weight G * p_i on row i's
  policy term (and on its k3 KL term when ``is_weight_kl``), so the weighted advantages of every
  replayed group sum to zero and pi = mu is exactly the on-policy GRPO update of those rows. In
  ``grpo_loss`` terms the row weight enters through the behavior channel: ``behavior_logps =
  pi_current - log(G p_i)``, so ``w = exp(old - behavior) = G p_i`` with ``is_cap >= G``.
  Ablations: ``recomputed`` (the first version: p_i for the baseline, row weight 1 and the per-token
  w = min(pi/mu, cap); biased, its weighted advantages do not sum to zero) and ``stored``.

Micro-batches hold whole groups; each micro-batch loss is scaled so that the accumulated gradient
equals the gradient of the full-batch loss for every ``loss_type``. In a multi-process run the
normalizers are the global ones divided by the world size (``rerule.train.distributed``), so the
rank-averaged gradient is the gradient of the whole global batch.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch

from rerule.loss import grpo_loss, token_logps
from rerule.train.rollout import (
    SeqBatch,
    autocast,
    completion_hidden,
    completion_logits,
    left_pad,
    lm_head,
    logps_from_hidden,
    right_pad,
)
from rerule.train.update_stats import ReplayWeightStats, SetStats, UpdateStats


@dataclass
class UpdateSet:
    """Rows to train on with their loss inputs. batch on the device; advantages / rewards [B];
    behavior / ref [B, T] or None; G rows per group, consecutive."""

    batch: SeqBatch
    advantages: torch.Tensor
    rewards: torch.Tensor
    behavior: torch.Tensor | None
    ref: torch.Tensor | None
    group_size: int
    sources: tuple = ()  # per row ("forget" / "boundary"); replayed sets only


# The update's per-step metrics (None where they do not apply, e.g. no replay this step).
UPDATE_METRICS = (
    "loss_on", "loss_replay", "kl", "replay_kl", "clip_ratio_low", "clip_ratio_high", "replay_clip_ratio_low",
    "replay_clip_ratio_high", "is_weight_mean", "is_weight_max", "is_ess", "is_truncated_frac", "replay_ess",
    "replay_adv_sum_forget", "replay_adv_sum_boundary",
)


def recompute_advantages(
    rewards: torch.Tensor,
    cur_logps: torch.Tensor,
    behavior: torch.Tensor,
    mask: torch.Tensor,
    group_size: int,
    eps: float = 1e-4,
) -> torch.Tensor:
    """Advantages of replayed groups under the current policy, [B] fp32.

    Per group, with sequence weights rho_i = pi_current(y_i) / mu(y_i) self-normalized to w_i
    (a softmax of the summed token log-ratios, so no overflow)::

        mean = sum_i w_i r_i
        var  = sum_i w_i (r_i - mean)^2 / (1 - sum_i w_i^2)    (unbiased for reliability weights)
        A_i  = (r_i - mean) / (max(std, std_uniform) + eps)

    With equal weights this is exactly GRPO's group advantage. The std is floored at the
    equal-weight std: when the weights pile onto completions with equal rewards, the weighted std
    goes to ~0 and would blow the advantage of a rare completion up by 1 / std.

    Args:
        rewards: [B]; cur_logps, behavior, mask: [B, T]; group_size: G.
    """
    r = rewards.double().reshape(-1, group_size)
    log_rho = ((cur_logps.double() - behavior.double()) * mask.double()).sum(-1).reshape(-1, group_size)
    w = torch.softmax(log_rho, dim=-1)
    mean = (w * r).sum(-1, keepdim=True)
    denom = (1.0 - (w * w).sum(-1, keepdim=True)).clamp(min=1e-12)
    std_w = ((w * (r - mean) ** 2).sum(-1, keepdim=True) / denom).sqrt()
    std_u = r.std(dim=-1, keepdim=True)
    return ((r - mean) / (torch.maximum(std_w, std_u) + eps)).reshape(-1).float()


REPLAY_ADVANTAGES = ("consistent", "recomputed", "stored")


@dataclass
class ReplayWeights:
    """One replayed set's estimator quantities (fp64, per row unless said).

    advantages: A_i; row_weights: the weight of row i's policy term in the gradient (G * p_i for
    ``consistent``, 1 otherwise); p: the self-normalized truncated sequence weights; ess: per group
    1 / sum_i p_i^2 (in samples, 1..G); truncated: rows whose raw sequence ratio exceeded the cap.
    """

    advantages: torch.Tensor
    row_weights: torch.Tensor
    p: torch.Tensor
    ess: torch.Tensor
    truncated: torch.Tensor

    def weighted_sums(self, group_size: int) -> torch.Tensor:
        """Per group sum_i row_weight_i * A_i: 0 for a consistent estimator (a GRPO group sums to 0)."""
        return (self.row_weights * self.advantages).reshape(-1, group_size).sum(-1)


def replay_weights(
    rewards: torch.Tensor,
    cur_logps: torch.Tensor,
    behavior: torch.Tensor,
    mask: torch.Tensor,
    group_size: int,
    cap: float,
    mode: str = "consistent",
    scale: str = "group",
    stored: torch.Tensor | None = None,
    eps: float = 1e-4,
) -> ReplayWeights:
    """Advantages and row weights of replayed groups under the current policy (docs/replay.md).

    Per group of G rows, with the sequence log-ratio l_i = sum_t mask * (pi_current - mu)::

        rho_i = min(exp(l_i), cap)            p_i = rho_i / sum_j rho_j   (a softmax of min(l_i, log cap))
        b     = sum_i p_i r_i                 s^2 = G / (G - 1) * sum_i p_i (r_i - b)^2
        A_i   = (r_i - b) / (s + eps)         (scale "none": A_i = r_i - b)

    ``consistent``: row weight G * p_i, so sum_i G p_i A_i = 0 in every group, and pi = mu gives
    p_i = 1 / G, GRPO's own advantages and row weight 1. ``recomputed`` (ablation, the first
    version): the same p_i for the baseline but row weight 1, and the std floored at the unweighted
    one. ``stored``: the advantages saved at admission, row weight 1.

    Args:
        rewards: [B]; cur_logps, behavior, mask: [B, T]; group_size: G (B divisible by G);
        cap: truncation of the sequence ratio; mode: one of ``REPLAY_ADVANTAGES``;
        scale: "group" / "batch" (the group std) or "none"; stored: [B] (mode "stored").
    """
    if mode not in REPLAY_ADVANTAGES:
        raise ValueError(f"mode must be one of {REPLAY_ADVANTAGES}, got {mode!r}")
    if not cap > 0:
        raise ValueError(f"cap must be > 0, got {cap!r}")
    G = group_size
    r = rewards.double().reshape(-1, G)
    log_ratio = ((cur_logps.double() - behavior.double()) * mask.double()).sum(-1).reshape(-1, G)
    # min(exp(l), cap) normalized in log space: no overflow for a sequence ratio of e^500
    p = torch.softmax(log_ratio.clamp(max=math.log(cap)), dim=-1)
    truncated = (log_ratio > math.log(cap)).reshape(-1)
    ess = 1.0 / (p * p).sum(-1)
    b = (p * r).sum(-1, keepdim=True)
    ones = torch.ones_like(r).reshape(-1)
    if mode == "stored":
        if stored is None:
            raise ValueError("mode 'stored' needs the stored advantages")
        return ReplayWeights(stored.double().reshape(-1), ones, p.reshape(-1), ess, truncated)
    if mode == "recomputed":
        adv = recompute_advantages(rewards, cur_logps, behavior, mask, G, eps).double()
        if scale == "none":
            adv = (r - (torch.softmax(log_ratio, -1) * r).sum(-1, keepdim=True)).reshape(-1)
        return ReplayWeights(adv, ones, p.reshape(-1), ess, truncated)
    if scale == "none":
        adv = r - b
    else:
        var = (p * (r - b) ** 2).sum(-1, keepdim=True) * (G / (G - 1) if G > 1 else 0.0)
        adv = (r - b) / (var.sqrt() + eps)
    return ReplayWeights(adv.reshape(-1), (G * p).reshape(-1), p.reshape(-1), ess, truncated)


def row_weight_behavior(cur_logps: torch.Tensor, row_weights: torch.Tensor) -> torch.Tensor:
    """Behavior log-probs that make the loss's detached weight w = exp(old - behavior) equal to
    ``row_weights`` on every token of a row (old = ``cur_logps``): cur - log(row_weight)."""
    return cur_logps - torch.log(row_weights.to(cur_logps.dtype)).unsqueeze(-1)


def _weight_sums(w: torch.Tensor, truncated: torch.Tensor) -> dict:
    """Sums over the replayed tokens of their weights ``w`` (fp64, one per unmasked token): n, sum w,
    sum w^2, truncated count, largest w (what ``ReplayWeightStats.add_tokens`` adds up)."""
    return {
        "n": float(w.numel()),
        "w": float(w.sum()),
        "w2": float((w * w).sum()),
        "truncated": float(truncated.sum()),
        "w_max": float(w.max()) if w.numel() else 0.0,
    }


def importance_stats(cur_logps: torch.Tensor, behavior: torch.Tensor, mask: torch.Tensor, cap: float) -> dict:
    """``_weight_sums`` of the token weights w = min(exp(cur - mu), cap) (modes stored / recomputed)."""
    valid = mask.bool()
    raw = torch.exp((cur_logps - behavior).double())[valid]
    return _weight_sums(raw.clamp(max=cap), raw > cap)


def weight_stats(row_weights: torch.Tensor, mask: torch.Tensor, truncated: torch.Tensor) -> dict:
    """``_weight_sums`` of the row weights G * p_i (mode consistent: every token of row i weighs
    row_weights[i]; truncated where the row's sequence ratio hit the cap)."""
    valid = mask.bool()
    w = row_weights.double().unsqueeze(-1).expand(mask.shape)[valid]
    return _weight_sums(w, truncated.unsqueeze(-1).expand(mask.shape)[valid])


def micro_slices(n_rows: int, rows_per_micro: int):
    return [(i, min(i + rows_per_micro, n_rows)) for i in range(0, n_rows, rows_per_micro)]


def loss_scale(loss_type: str, rows: int, tokens: float, total_rows: int, total_tokens: float) -> float:
    """Factor that turns a micro-batch's loss into its share of the whole set's loss."""
    if loss_type in ("grpo", "dr_grpo"):
        return rows / total_rows
    if loss_type == "bnpo":
        return tokens / max(total_tokens, 1.0)
    return 1.0  # dapo: num_items_in_batch already carries the global token count


class PolicyUpdate:
    """One optimizer step's worth of forward/backward over fresh and replayed groups.

    Args:
        model: the policy; loss_kwargs: grpo_loss options (temperature, clips, beta, loss_type ...);
        loss_impl: "logits" or "fused_linear"; kernel_impl: loss backend; amp_dtype: autocast dtype;
        rows_per_micro: rows per forward (whole groups; None: all); cap: w truncation; lam: lambda;
        advantages: "recomputed" or "stored" for replayed groups;
        replay_normalize: "batch" (one normalizer over fresh + replayed rows) or "replay" (own mean);
        dist: a multi-process ``rerule.train.distributed.Dist`` (None: one process);
        forward: the module the forward goes through (DDP around ``CompletionScorer``; None: ``model``).
    """

    def __init__(self, model, loss_kwargs: dict, loss_impl: str, kernel_impl: str, amp_dtype,
                 rows_per_micro: int | None, cap: float, lam: float, advantages: str = "consistent",
                 dist=None, forward=None, replay_normalize: str = "batch", scale: str = "group"):
        self.model, self.kw, self.loss_impl = model, dict(loss_kwargs), loss_impl
        self.kernel_impl = kernel_impl
        self.amp, self.rows_per_micro, self.cap, self.lam = amp_dtype, rows_per_micro, cap, lam
        if advantages not in REPLAY_ADVANTAGES:
            raise ValueError(f"advantages must be one of {REPLAY_ADVANTAGES}, got {advantages!r}")
        self.adv_mode, self.scale = advantages, scale
        self.replay_normalize = replay_normalize
        self.dist, self.forward = dist, forward
        if loss_impl == "fused_linear":
            from rerule.fused_linear import fused_linear_grpo_loss

            self._fused = fused_linear_grpo_loss

    def _features(self, mb: SeqBatch):
        with autocast(mb.completion_ids.device, self.amp):
            if self.forward is not None:
                return self.forward(mb.prompt_ids, mb.prompt_mask, mb.completion_ids, mb.completion_mask)
            if self.loss_impl == "logits":
                return completion_logits(self.model, mb)
            return completion_hidden(self.model, mb)

    @torch.no_grad()
    def _current_logps(self, feats, mb: SeqBatch) -> torch.Tensor:
        temperature = self.kw["temperature"]
        if self.loss_impl == "logits":
            return token_logps(feats.detach(), mb.completion_ids, mb.completion_mask, temperature=temperature,
                               impl=self.kernel_impl)[0]
        weight, bias = lm_head(self.model)
        hidden = feats.detach().to(weight.dtype)
        return logps_from_hidden(hidden, weight, bias, mb, temperature, self.kernel_impl)

    def _loss(self, feats, mb: SeqBatch, adv, behavior, ref, num_items, cap):
        kw = dict(self.kw, is_cap=cap, impl=self.kernel_impl, behavior_logps=behavior,
                  ref_logps=ref if self.kw["beta"] > 0 else None)
        if kw["loss_type"] == "dapo":
            kw["num_items_in_batch"] = num_items
        if self.loss_impl == "logits":
            return grpo_loss(feats, mb.completion_ids, mb.completion_mask, adv, **kw)
        weight, bias = lm_head(self.model)
        # The GEMM runs in one dtype: the autocast dtype when there is one (fp32 master weights are cast).
        dtype = self.amp or weight.dtype
        bias = None if bias is None else bias.to(dtype)
        return self._fused(feats.to(dtype), weight.to(dtype), mb.completion_ids, mb.completion_mask, adv,
                           bias=bias, **kw)

    def _part_loss(self, feats, mb: SeqBatch, s: UpdateSet, rows: slice, weight: float, replay: bool,
                   total_rows: float, total_tokens: float, stats: UpdateStats, logps: torch.Tensor):
        """Loss of one set's rows ``rows`` inside the micro-batch ``mb`` (``feats`` already sliced);
        returns the scaled loss and writes the pre-update logps and the advantages used."""
        t = mb.completion_ids.shape[1]
        adv = s.advantages[rows]
        behavior = None if s.behavior is None else _cols(s.behavior[rows], t)
        ref = None if s.ref is None else _cols(s.ref[rows], t)
        part = stats.replay if replay else stats.fresh
        cap = self.cap
        if replay:
            cur = self._current_logps(feats, mb)
            rw = replay_weights(s.rewards[rows], cur, behavior, mb.completion_mask, s.group_size, self.cap,
                                self.adv_mode, self.scale, stored=adv)
            adv = rw.advantages.float()
            if self.adv_mode == "consistent":
                # Row weight G * p_i through the behavior channel: w = exp(old - behavior) = G * p_i.
                behavior, cap = row_weight_behavior(cur, rw.row_weights), float(s.group_size)
                w = weight_stats(rw.row_weights, mb.completion_mask, rw.truncated)
            else:
                w = importance_stats(cur, behavior, mb.completion_mask, self.cap)
            stats.weights.add_tokens(w)
            stats.weights.add_groups(rw, s.sources[rows.start : rows.stop : s.group_size], s.group_size)
        out = self._loss(feats, mb, adv.to(feats.device), behavior, ref, total_tokens, cap)
        n_tok = float(mb.completion_mask.sum())
        share = loss_scale(self.kw["loss_type"], rows.stop - rows.start, n_tok, total_rows, total_tokens)
        logps[rows, : min(t, logps.shape[1])] = out.logps[:, : logps.shape[1]]
        part.advantages[rows] = adv.to(part.advantages.device)
        part.add(out, share, n_tok)
        return out.loss * (weight * share)

    def __call__(self, fresh: UpdateSet, replayed: UpdateSet | None) -> tuple[torch.Tensor, dict]:
        """Accumulate gradients for L_on + lambda * L_replay. Returns (fresh pre-update logps [B, T], stats):
        stats has ``UPDATE_METRICS`` (replay ones only when there was replay), train_tokens, and the
        advantages used (``advantages``, ``replay_advantages``).

        Fresh and replayed rows go through the model together (one forward and one backward per
        micro-batch, not one more per replayed batch); each set's loss is taken on its own rows."""
        sets = [(fresh, 1.0, False)]
        if replayed is not None and self.lam > 0:
            sets.append((replayed, self.lam, True))
        batch = SeqBatch.cat([s.batch for s, _, _ in sets])
        starts = [0, len(fresh.batch)] + ([len(fresh.batch) + len(replayed.batch)] if len(sets) > 1 else [])
        totals = [float(s.batch.completion_mask.sum()) for s, _, _ in sets]
        rows_total = [len(s.batch) for s, _, _ in sets]
        with_replay = len(sets) > 1
        if self.dist is not None:
            # Global rows / tokens per set over W; a rank without replayed rows this step adds zeros.
            rows_total, totals = self.dist.per_rank_totals(rows_total + [0] * (2 - len(sets)),
                                                           totals + [0.0] * (2 - len(sets)))
            with_replay = self.lam > 0 and rows_total[1] > 0
        if with_replay and self.replay_normalize == "batch":
            # One normalizer over fresh + replayed rows: L = (sum_on + lambda * sum_replay) / N_all, so
            # lambda = 1 weighs a replayed row like a fresh one (a per-set mean would weigh each of the
            # few replayed rows ~1/fraction times a fresh row).
            rows_total, totals = [sum(rows_total)] * 2, [sum(totals)] * 2
        device = batch.completion_ids.device
        logps = [torch.zeros(s.batch.completion_ids.shape, device=device) for s, _, _ in sets]
        stats = UpdateStats(SetStats(), SetStats(), ReplayWeightStats())
        for (s, _, replay), lp in zip(sets, logps):
            (stats.replay if replay else stats.fresh).advantages = torch.zeros(len(s.batch), device=lp.device)
        slices = micro_slices(len(batch), self.rows_per_micro or len(batch))
        n_passes = len(slices) if self.dist is None else self.dist.micro_steps(len(slices))
        for step in range(n_passes):
            sync = contextlib.nullcontext()
            if self.dist is not None:
                sync = self.dist.sync_context(self.forward or self.model, last=step == n_passes - 1)
            with sync:
                if step >= len(slices):
                    # FSDP: every forward/backward is a collective, so a rank with fewer micro-batches
                    # runs zero-loss passes to stay in step with the others.
                    (self._features(batch.rows(0, 1)).float().sum() * 0.0).backward()
                    continue
                i, j = slices[step]
                mb = batch.rows(i, j)
                feats = self._features(mb)
                loss = 0.0
                for k, (s, weight, replay) in enumerate(sets):
                    a, b = max(i, starts[k]), min(j, starts[k + 1])
                    if a >= b:
                        continue
                    part = mb.rows(a - i, b - i, trim=False)
                    rows = slice(a - starts[k], b - starts[k])
                    x = feats[a - i : b - i]
                    loss = loss + self._part_loss(x, part, s, rows, weight, replay, rows_total[k], totals[k],
                                                  stats, logps[k])
                loss.backward()
        if self.dist is not None:
            self.dist.reduce_update(stats)
        return logps[0], stats.metrics(with_replay)


def _cols(x: torch.Tensor, t: int) -> torch.Tensor:
    """[B, T'] -> [B, t]: cut or zero-pad the columns (padding is masked out by the loss)."""
    return x[:, :t] if x.shape[1] >= t else torch.nn.functional.pad(x, (0, t - x.shape[1]))


def collate_replay(groups, pad_id: int, device) -> UpdateSet:
    """Stack replayed groups into one UpdateSet (prompts left-padded, completions right-padded)."""
    G = groups[0].group_size
    prompt_ids, prompt_mask = left_pad([g.prompt_ids for g in groups for _ in range(g.group_size)], pad_id)
    ids = right_pad([g.completion_ids for g in groups], pad_id)
    mask = right_pad([g.completion_mask for g in groups], 0)
    behavior = right_pad([g.behavior_logps for g in groups], 0.0)
    has_ref = all(g.ref_logps is not None for g in groups)
    ref = right_pad([g.ref_logps for g in groups], 0.0) if has_ref else None
    batch = SeqBatch(prompt_ids, prompt_mask, ids, mask).to(device)
    return UpdateSet(
        batch,
        torch.cat([g.advantages for g in groups]).to(device),
        torch.cat([g.rewards for g in groups]).to(device),
        behavior.to(device),
        None if ref is None else ref.to(device),
        G,
        tuple(g.source for g in groups for _ in range(g.group_size)),
    )
