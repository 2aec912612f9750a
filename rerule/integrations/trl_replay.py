"""``ReplayGRPOTrainer``: ReRULE's hard-case replay inside TRL's GRPO loop.

How it departs from ``FusedGRPOTrainer`` (docs/replay.md):

1. After TRL generates and scores a batch (``_generate_and_score_completions``), each group of
   ``num_generations`` completions whose mean reward is under ``replay_threshold`` and whose rewards
   are not all equal goes into a ``rerule.train.buffer.ReplayBuffer`` with its token ids, masks, rewards,
   advantages, reference log-probs and behavior log-probs mu. mu is TRL's ``old_per_token_logps``
   when TRL computed them, else one no-grad forward of the generating policy over the stored rows
   (trainer numerics: with vLLM, the vLLM/trainer mismatch of a replayed group is not corrected).
   A prompt whose fresh group scores at or above the threshold has its stored groups evicted.
2. From global step ``replay_start_step`` on, ``replay_fraction`` x (fresh groups) groups are drawn
   from the buffer and appended to the batch (rounded so the batch still splits evenly over
   ``steps_per_generation``). For them pi_old is a no-grad forward of the current policy. Their
   advantages and row weights come from ``rerule.train.update.replay_weights``: by default the consistent
   estimator (``replay_advantages="consistent"``, docs/replay.md): per group, truncated sequence
   ratios min(pi_old / mu, replay_is_cap), self-normalized to p_i, give the baseline, the std and
   the row weight G * p_i, so the group's weighted advantages sum to zero; the ablations
   ``"recomputed"`` (the first version: p_i baseline, row weight 1, token weights) and ``"stored"``.
3. The loss of a micro-batch is L_on(fresh rows) + replay_weight * L_replay(replayed rows), one
   backbone forward for both. L_on is exactly FusedGRPOTrainer's (TRL's) loss. L_replay is the
   decoupled form: the PPO clip against pi_old and a detached weight on the policy term (consistent:
   the row weight G * p_i; the ablations: the token weight min(pi_old / mu, replay_is_cap)), the same
   loss_type, its normalizer taken over the replayed rows (dapo: replayed tokens of the whole
   generation batch). With beta > 0 the KL term is the fresh rows' (k3, times pi / pi_old under
   ``use_bias_correction_kl``), not weighted, as in rerule's loss spec.

Logged: replay/buffer_size, replay/admitted, replay/groups, replay/is_weight_mean,
replay/is_truncated_frac, replay/is_ess, replay/ess (sequence level, per group, in samples),
replay/adv_sum (mean over replayed groups of sum_i row_weight_i * A_i), replay/loss, next to TRL's
metrics for the fresh rows.
Not supported with replay: tool masks and multimodal inputs (the batch is left as TRL made it).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import torch
from trl import GRPOConfig

from rerule import fused_linear_grpo_loss
from rerule.integrations.trl_fused import FusedGRPOTrainer
from rerule.train.buffer import ReplayBuffer, ReplayGroup, admit_groups
from rerule.train.update import REPLAY_ADVANTAGES, replay_weights, row_weight_behavior

REPLAY_KEYS = ("replay_mask", "behavior_per_token_logps", "replay_num_items")
_SKIP_KEYS = (
    "tool_mask",
    "pixel_values",
    "image_grid_thw",
    "pixel_attention_mask",
    "image_sizes",
    "num_images",
    "token_type_ids",
    "mm_token_type_ids",
    "image_position_ids",
    "spatial_shapes",
    "num_tiles",
)


@dataclass
class ReplayGRPOConfig(GRPOConfig):
    """``GRPOConfig`` plus ReRULE's replay settings (defaults follow the toy-study guide in docs/replay.md)."""

    replay_threshold: float = field(
        default=0.5, metadata={"help": "store groups whose mean reward is below this"}
    )
    replay_start_step: int = field(default=1, metadata={"help": "global step from which groups are replayed"})
    replay_fraction: float = field(
        default=0.2, metadata={"help": "replayed groups per generation, as a fraction of the fresh groups"}
    )
    replay_weight: float = field(default=1.0, metadata={"help": "lambda in L_on + lambda * L_replay"})
    replay_is_cap: float = field(default=2.0, metadata={"help": "truncation of w = pi_old / mu"})
    replay_capacity: int = field(default=256, metadata={"help": "most groups held in the buffer"})
    replay_staleness: int = field(default=16, metadata={"help": "drop groups older than this many steps"})
    replay_max_reuse: int = field(default=4, metadata={"help": "drop a group after this many replays"})
    replay_advantages: str = field(
        default="consistent",
        metadata={"help": "'consistent' (self-normalized truncated sequence weights give baseline, std and "
                  "row weight), 'recomputed' (biased ablation) or 'stored'"},
    )
    replay_seed: int = field(default=0, metadata={"help": "seed of the buffer's sampler"})

    def __post_init__(self):
        super().__post_init__()
        if self.replay_advantages not in REPLAY_ADVANTAGES:
            raise ValueError(
                f"replay_advantages must be one of {REPLAY_ADVANTAGES}, got {self.replay_advantages!r}"
            )
        if not 0 <= self.replay_fraction <= 1:
            raise ValueError(f"replay_fraction must be in [0, 1], got {self.replay_fraction}")
        if not self.replay_is_cap > 0 or not self.replay_weight >= 0:
            raise ValueError("replay_is_cap must be > 0 and replay_weight >= 0")
        if self.replay_start_step < 0:
            raise ValueError(f"replay_start_step must be >= 0, got {self.replay_start_step}")


def _pad_to(t, length, left=False, value=0):
    """Pad dim 1 of a [B, T] tensor to ``length``."""
    extra = length - t.size(1)
    if extra <= 0:
        return t
    pad = t.new_full((t.size(0), extra), value)
    return torch.cat([pad, t] if left else [t, pad], dim=1)


class ReplayGRPOTrainer(FusedGRPOTrainer):
    """``FusedGRPOTrainer`` with ReRULE's hard-case replay (see the module docstring).

    ``args`` must be a ``ReplayGRPOConfig``. ``replay_buffer`` optionally supplies a configured
    ``rerule.train.buffer.ReplayBuffer`` (else one is built from the config).
    """

    def __init__(self, *args, replay_buffer: ReplayBuffer | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        a = self.args
        if not isinstance(a, ReplayGRPOConfig):
            raise TypeError(f"ReplayGRPOTrainer needs args=ReplayGRPOConfig(...), got {type(a).__name__}")
        self.replay_buffer = replay_buffer or ReplayBuffer(
            capacity=a.replay_capacity,
            threshold=a.replay_threshold,
            staleness=a.replay_staleness,
            max_reuse=a.replay_max_reuse,
            seed=a.replay_seed,
        )
        self._rewards_per_func = None
        self._replay_warned = False

    def _calculate_rewards(self, *args, **kwargs):
        rewards_per_func = super()._calculate_rewards(*args, **kwargs)
        self._rewards_per_func = rewards_per_func  # [N_global, n_funcs], kept for the buffer
        return rewards_per_func

    def _generate_and_score_completions(self, inputs):
        out = super()._generate_and_score_completions(inputs)
        if not self.model.training:
            return out
        G, B = self.num_generations, out["completion_ids"].size(0)
        if any(out.get(k) is not None for k in _SKIP_KEYS) or B % G:
            if not self._replay_warned:
                warnings.warn(
                    "replay skipped: tool masks, multimodal inputs or groups split across processes",
                    stacklevel=2,
                )
                self._replay_warned = True
            return out
        rpf = self._rewards_per_func
        rewards = (rpf * self.reward_weights.to(rpf.device).unsqueeze(0)).nansum(dim=1)
        rewards[torch.isnan(rpf).all(dim=1)] = torch.nan
        start = self.accelerator.process_index * B
        rewards = rewards[start : start + B].float().cpu()
        step = self.state.global_step
        self._store_hard_groups(inputs, out, rewards, step)
        metrics = self._metrics["train"]
        if step >= self.args.replay_start_step:
            out = self._mix_replay(out, step)
        metrics["replay/groups"].append(float(out["replay_mask"].sum()) / G if "replay_mask" in out else 0.0)
        metrics["replay/buffer_size"].append(float(len(self.replay_buffer)))
        return out

    @torch.no_grad()
    def _policy_logps(self, prompt_ids, prompt_mask, completion_ids, completion_mask, model=None):
        logps, _, _ = self._get_per_token_logps_and_entropies(
            model or self.model,
            torch.cat([prompt_ids, completion_ids], 1),
            torch.cat([prompt_mask, completion_mask], 1),
            completion_ids.size(1),
            batch_size=self.args.per_device_train_batch_size,
        )
        return logps.float()

    def _store_hard_groups(self, inputs, out, rewards, step):
        G = self.num_generations
        groups = rewards.view(-1, G)
        keys = [
            hash(tuple(out["prompt_ids"][g * G][out["prompt_mask"][g * G] != 0].tolist()))
            for g in range(groups.size(0))
        ]
        sources = [str(inputs[g * G].get("source", "trl")) for g in range(groups.size(0))]

        def build(hard):
            rows = torch.cat([torch.arange(g * G, (g + 1) * G) for g in hard]).to(out["completion_ids"].device)
            pick = lambda k: None if out.get(k) is None else out[k].index_select(0, rows)
            mu = pick("old_per_token_logps")
            if mu is None:
                mu = self._policy_logps(
                    pick("prompt_ids"), pick("prompt_mask"), pick("completion_ids"), pick("completion_mask")
                )
            ref = pick("ref_per_token_logps")
            cpu = lambda t: None if t is None else t.detach().cpu()
            cols = {
                k: cpu(pick(k))
                for k in ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask", "advantages")
            }
            mu, ref = cpu(mu).float(), cpu(ref)
            return [
                ReplayGroup(
                    key=keys[g],
                    prompt_ids=cols["prompt_ids"][i * G][cols["prompt_mask"][i * G] != 0],
                    completion_ids=cols["completion_ids"][i * G : (i + 1) * G],
                    completion_mask=cols["completion_mask"][i * G : (i + 1) * G],
                    rewards=groups[g].clone(),
                    advantages=cols["advantages"][i * G : (i + 1) * G].float(),
                    behavior_logps=mu[i * G : (i + 1) * G],
                    step=step,
                    source=sources[g],
                    ref_logps=None if ref is None else ref[i * G : (i + 1) * G].float(),
                )
                for i, g in enumerate(hard)
            ]

        admitted, _ = admit_groups(self.replay_buffer, groups, keys, sources, build)
        self._metrics["train"]["replay/admitted"].append(float(admitted))

    def _n_replay_groups(self, n_fresh_groups):
        want = self.args.replay_fraction * n_fresh_groups
        want = max(1, round(want)) if want > 0 else 0
        # Rows must split evenly over steps_per_generation (TRL drops a remainder).
        spg, G = self.args.steps_per_generation, self.num_generations
        k = spg // math.gcd(G, spg)
        n = math.ceil(want / k) * k
        return min(n, (len(self.replay_buffer) // k) * k)

    def _mix_replay(self, out, step):
        buf, G = self.replay_buffer, self.num_generations
        buf.expire(step)
        n = self._n_replay_groups(out["completion_ids"].size(0) // G)
        if n == 0:
            return out
        groups = buf.sample(n, step)
        device = out["completion_ids"].device
        P = max(g.prompt_ids.numel() for g in groups)
        C = max(g.completion_ids.size(1) for g in groups)
        rows = lambda name: torch.cat([_pad_to(getattr(g, name), C) for g in groups]).to(device)
        prompt = torch.stack(
            [_pad_to(g.prompt_ids[None], P, left=True, value=self._tokenizer.pad_token_id)[0] for g in groups]
        )
        pmask = torch.stack([_pad_to(torch.ones_like(g.prompt_ids)[None], P, left=True)[0] for g in groups])
        rep = {
            "prompt_ids": prompt.repeat_interleave(G, 0).to(device),
            "prompt_mask": pmask.repeat_interleave(G, 0).to(device),
            "completion_ids": rows("completion_ids"),
            "completion_mask": rows("completion_mask"),
        }
        mu = rows("behavior_logps")
        cur = self._policy_logps(
            rep["prompt_ids"], rep["prompt_mask"], rep["completion_ids"], rep["completion_mask"]
        )
        rewards = torch.cat([g.rewards for g in groups]).to(device)
        mode = self.args.replay_advantages
        rw = replay_weights(rewards, cur, mu, rep["completion_mask"], G, self.args.replay_is_cap, mode,
                            scale="none" if self.scale_rewards == "none" else "group",
                            stored=torch.cat([g.advantages for g in groups]))
        rep["advantages"] = rw.advantages.to(device, out["advantages"].dtype)
        metrics = self._metrics["train"]
        metrics["replay/ess"].append(float(rw.ess.mean()))
        metrics["replay/adv_sum"].append(float(rw.weighted_sums(G).mean()))
        # consistent: the row weight G * p_i reaches the loss as w = exp(old - behavior) (rerule.train.update)
        weight_logps = row_weight_behavior(cur, rw.row_weights.to(device)) if mode == "consistent" else mu
        if out.get("old_per_token_logps") is not None:
            rep["old_per_token_logps"] = cur
        if out.get("ref_per_token_logps") is not None:
            if all(g.ref_logps is not None for g in groups):
                rep["ref_per_token_logps"] = rows("ref_logps")
            elif self.beta == 0.0:
                rep["ref_per_token_logps"] = cur  # never read by the loss when beta == 0
            else:
                rep["ref_per_token_logps"] = self._reference_logps(rep)
        if out.get("sampling_per_token_logps") is not None:
            rep["sampling_per_token_logps"] = mu
        if out.get("importance_sampling_ratio") is not None:
            # Replayed rows are weighted by w = pi_old / mu in L_replay instead of TRL's vLLM ratio.
            rep["importance_sampling_ratio"] = torch.ones(
                mu.size(0), out["importance_sampling_ratio"].size(1), device=device
            )
        return self._concat(out, rep, weight_logps)

    @torch.no_grad()
    def _reference_logps(self, rep):
        if self.ref_model is not None:
            return self._policy_logps(
                rep["prompt_ids"],
                rep["prompt_mask"],
                rep["completion_ids"],
                rep["completion_mask"],
                model=self.ref_model,
            )
        from trl.trainer.utils import use_adapter

        model = self.accelerator.unwrap_model(self.model)
        with use_adapter(model, adapter_name="ref" if "ref" in model.peft_config else None):
            return self._policy_logps(
                rep["prompt_ids"], rep["prompt_mask"], rep["completion_ids"], rep["completion_mask"]
            )

    def _concat(self, out, rep, mu):
        B_f, B_r = out["completion_ids"].size(0), rep["completion_ids"].size(0)
        P = max(out["prompt_ids"].size(1), rep["prompt_ids"].size(1))
        C = max(out["completion_ids"].size(1), rep["completion_ids"].size(1))
        merged = dict(out)
        for key, value in rep.items():
            a = out[key]
            if key.startswith("prompt"):
                fill = self._tokenizer.pad_token_id if key == "prompt_ids" else 0
                merged[key] = torch.cat([_pad_to(a, P, True, fill), _pad_to(value, P, True, fill)])
            elif a.dim() == 2 and a.size(1) != 1:
                merged[key] = torch.cat([_pad_to(a, C), _pad_to(value.to(a.dtype), C)])
            else:
                merged[key] = torch.cat([a, value.to(a.dtype)])
        stale = [k for k, v in merged.items() if torch.is_tensor(v) and v.dim() > 0 and v.size(0) == B_f]
        if stale:
            raise RuntimeError(f"replay cannot extend these batch keys to the replayed rows: {stale}")
        device = mu.device
        merged["replay_mask"] = torch.cat(
            [torch.zeros(B_f, dtype=torch.bool), torch.ones(B_r, dtype=torch.bool)]
        ).to(device)
        merged["behavior_per_token_logps"] = torch.cat([torch.zeros(B_f, C, device=device), _pad_to(mu, C)])
        tokens = rep["completion_mask"].sum().to(torch.float32)
        merged["replay_num_items"] = self.accelerator.gather(tokens.reshape(1)).sum()
        return merged

    def _compute_loss(self, model, inputs):
        replay_mask = inputs.get("replay_mask")
        base = {k: v for k, v in inputs.items() if k not in REPLAY_KEYS}
        if replay_mask is None or not bool(replay_mask.any()):
            return super()._compute_loss(model, base)
        self._check_supported(base)
        mode = "train" if self.model.training else "eval"
        B = replay_mask.numel()
        idx = {"fresh": (~replay_mask).nonzero().squeeze(1), "replay": replay_mask.nonzero().squeeze(1)}
        select = lambda i: {
            k: (v.index_select(0, i) if torch.is_tensor(v) and v.dim() > 0 and v.size(0) == B else v)
            for k, v in inputs.items()
        }
        parts = {name: select(i) for name, i in idx.items() if i.numel()}
        specs = {}
        for name, part in parts.items():
            if name == "fresh":
                specs[name] = self._rerule_loss_spec(part, part["completion_mask"], mode)
            else:
                specs[name] = self._rerule_loss_spec(
                    part,
                    part["completion_mask"],
                    mode,
                    behavior_logps=part["behavior_per_token_logps"],
                    # consistent: w carries the row weight G * p_i <= G, which must not be truncated again
                    is_cap=(float(self.num_generations) if self.args.replay_advantages == "consistent"
                            else self.args.replay_is_cap),
                    num_items=part["replay_num_items"],
                )

        def head(h, weight, bias):
            return {
                name: fused_linear_grpo_loss(
                    h.index_select(0, idx[name]),
                    weight,
                    part["completion_ids"],
                    part["completion_mask"],
                    part["advantages"],
                    bias=bias,
                    **specs[name][0],
                )
                for name, part in parts.items()
            }

        outs = self._rerule_forward(model, inputs, head)
        loss = 0.0
        if "fresh" in outs:
            loss = loss + outs["fresh"].loss / specs["fresh"][1]
            self._log_trl_metrics(mode, outs["fresh"], parts["fresh"], parts["fresh"]["completion_mask"])
        rep_loss = outs["replay"].loss / specs["replay"][1]
        loss = loss + self.args.replay_weight * rep_loss
        m = outs["replay"].metrics
        stats = (
            self.accelerator.gather(
                torch.stack(
                    [rep_loss.detach(), m["is_weight_mean"], m["is_truncated_frac"], m["is_ess"]]
                ).reshape(1, 4)
            )
            .mean(0)
            .tolist()
        )
        for name, value in zip(("loss", "is_weight_mean", "is_truncated_frac", "is_ess"), stats):
            self._metrics[mode][f"replay/{name}"].append(value)
        self.replay_buffer.record_is_weights(stats[1], stats[3])
        return loss
