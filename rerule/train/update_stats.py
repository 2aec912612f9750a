"""What one policy update accumulates, typed: per set (fresh, replayed) its loss, tokens, KL and clip
sums (``SetStats``); over replayed tokens and groups the weight statistics (``ReplayWeightStats``);
``UpdateStats`` holds the three, gives the fields the ranks sum (``Dist.reduce_update``) and turns
them into the step's update metrics."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class SetStats:
    """Sums over one set's rows (fresh or replayed) in an update: its loss (each micro-batch's scaled to its
    share), its tokens, and token-weighted sums of the micro-batch means of KL and clip fractions."""

    advantages: torch.Tensor | None = None  # the advantages the loss used, per row
    loss: float = 0.0
    tokens: float = 0.0
    kl: float = 0.0
    clip_ratio_low: float = 0.0
    clip_ratio_high: float = 0.0

    def add(self, out, share: float, n_tok: float) -> None:
        self.loss += float(out.loss.detach()) * share
        self.tokens += n_tok
        self.kl += float(out.metrics["kl"]) * n_tok
        self.clip_ratio_low += float(out.metrics["clip_ratio_low"]) * n_tok
        self.clip_ratio_high += float(out.metrics["clip_ratio_high"]) * n_tok


@dataclass
class ReplayWeightStats:
    """Over replayed tokens: count, sum of w, sum of w^2, truncated count, largest w; per replayed group
    (by source): group counts, sums of sum_i row_weight_i * A_i, and the sequence-level ESS sum.

    These sums are the one source of the logged is_weight_mean / is_weight_max / is_ess /
    is_truncated_frac; the loss's own metrics of the same names are not used by the update, because:

    - the step's values span every micro-batch and rank, which needs sums (n, sum w, sum w^2, max), not
      the loss's per-call fp32 means (a mean of micro-batch means is not the mean over tokens);
    - with ``adv_mode`` consistent the loss's w is the row weight G * p_i passed as behavior log-probs
      with cap G (``row_weight_behavior``): the loss never truncates it, while the truncated share logged
      here counts the rows whose sequence ratio hit the replay cap (docs/replay.md);
    - with stored / recomputed the quantity is the loss's w = min(exp(cur - mu), cap), taken here in fp64
      from the same current log-probs, so switching to the kernel's fp32 values would change the logged
      numbers in their last bits.
    """

    n: float = 0.0
    w: float = 0.0
    w2: float = 0.0
    truncated: float = 0.0
    w_max: float = 0.0
    groups_forget: float = 0.0
    groups_boundary: float = 0.0
    adv_sum_forget: float = 0.0
    adv_sum_boundary: float = 0.0
    ess_sum: float = 0.0
    ess_groups: float = 0.0

    def add_tokens(self, w: dict) -> None:
        """Add ``importance_stats`` / ``weight_stats`` of one micro-batch."""
        self.w_max = max(self.w_max, w["w_max"])
        self.n += w["n"]
        self.w += w["w"]
        self.w2 += w["w2"]
        self.truncated += w["truncated"]

    def add_groups(self, rw, sources, group_size: int) -> None:
        """Per replayed source (``rw``: the groups' ``ReplayWeights``): groups, the sum over groups of
        sum_i row_weight_i * A_i, and the sequence-level ESS."""
        sums = rw.weighted_sums(group_size).tolist()
        for src, total, ess in zip(sources, sums, rw.ess.tolist()):
            if src == "forget":
                self.groups_forget += 1
                self.adv_sum_forget += total
            else:
                self.groups_boundary += 1
                self.adv_sum_boundary += total
            self.ess_sum += ess
            self.ess_groups += 1


@dataclass
class UpdateStats:
    """What one update accumulates (per rank; ``Dist.reduce_update`` makes it global)."""

    fresh: SetStats
    replay: SetStats
    weights: ReplayWeightStats

    def sums(self) -> list[float]:
        """The fields that add up over ranks, in a fixed order (``set_sums`` reads them back)."""
        f, r, w = self.fresh, self.replay, self.weights
        return [f.tokens, f.kl, f.clip_ratio_low, f.clip_ratio_high, r.tokens, r.kl, r.clip_ratio_low,
                r.clip_ratio_high, w.n, w.w, w.w2, w.truncated, w.groups_forget, w.groups_boundary,
                w.adv_sum_forget, w.adv_sum_boundary, w.ess_sum, w.ess_groups]

    def set_sums(self, values: list[float]) -> None:
        f, r, w = self.fresh, self.replay, self.weights
        (f.tokens, f.kl, f.clip_ratio_low, f.clip_ratio_high, r.tokens, r.kl, r.clip_ratio_low, r.clip_ratio_high,
         w.n, w.w, w.w2, w.truncated, w.groups_forget, w.groups_boundary, w.adv_sum_forget, w.adv_sum_boundary,
         w.ess_sum, w.ess_groups) = values

    def metrics(self, with_replay: bool) -> dict:
        """The update's part of a step's metrics (``UPDATE_METRICS``, train_tokens, the advantages used)."""
        f, r, w = self.fresh, self.replay, self.weights
        out = {"loss_on": f.loss, "train_tokens": f.tokens, "advantages": f.advantages}
        out.update({"kl": f.kl / max(f.tokens, 1.0), "clip_ratio_low": f.clip_ratio_low / max(f.tokens, 1.0),
                    "clip_ratio_high": f.clip_ratio_high / max(f.tokens, 1.0)})
        if not with_replay:
            return out
        n = max(w.n, 1.0)
        out.update({
            "loss_replay": r.loss, "replay_tokens": r.tokens,
            "replay_kl": r.kl / max(r.tokens, 1.0),
            "replay_clip_ratio_low": r.clip_ratio_low / max(r.tokens, 1.0),
            "replay_clip_ratio_high": r.clip_ratio_high / max(r.tokens, 1.0),
            # a rank without replayed rows in a step where other ranks have some reports 0.0
            "replay_advantages": r.advantages if r.advantages is not None else 0.0,
            "is_weight_mean": w.w / n, "is_weight_max": w.w_max,
            "is_truncated_frac": w.truncated / n,
            # normalized effective sample size (sum w)^2 / (n sum w^2), in (0, 1]
            "is_ess": w.w ** 2 / (n * w.w2) if w.w2 > 0 else 1.0,
            # sequence level, per replayed group: 1 / sum_i p_i^2 in samples (1..G), averaged over groups
            "replay_ess": w.ess_sum / max(w.ess_groups, 1.0),
            # per source, summed over its replayed groups: sum_i row_weight_i * A_i (0 when consistent)
            "replay_adv_sum_forget": w.adv_sum_forget if w.groups_forget else None,
            "replay_adv_sum_boundary": w.adv_sum_boundary if w.groups_boundary else None,
        })
        out["train_tokens"] += r.tokens
        return out
