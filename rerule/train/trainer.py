"""The RULE / ReRULE trainer: warm start -> on-policy RULE -> hybrid replay, one loop.

Each step (``train_step``) reads top to bottom:

    sample prompts -> generate G completions each -> rule-based rewards -> group advantages
    -> draw hard groups from the buffer (hybrid stage) -> one update on L_on + lambda * L_replay
    -> buffer bookkeeping (evict solved prompts, admit new hard groups) -> metrics, checkpoint

How it departs from plain GRPO (RULE):
- replayed groups are an off-policy estimate of the on-policy GRPO update (``rerule.train.update.replay_weights``,
  docs/replay.md): self-normalized truncated sequence weights p_i = min(pi / mu, cap) / sum_j give each
  group's baseline and std AND the row weight G * p_i, so its weighted advantages sum to zero; the PPO
  clip is taken against the current policy;
- hard groups (mean reward under the threshold, not flat) are stored with their behavior
  log-probs, which come for free: they are the log-probs the update's own forward computes before
  the optimizer moves (the sampling policy, scored by the fused loss path);
- ``replay.enabled=false`` runs the identical loop with no buffer: plain RULE, so the two compare fairly.

Under ``accelerate launch`` / ``torchrun`` every rank runs this loop on its own prompts and buffer;
gradients, loss normalizers and metrics are reduced across ranks (``rerule.train.distributed``).

Python API (what the demo calls)::

    trainer = Trainer(config, model=None, tokenizer=None, task=None, reward_fn=None, evaluate_fn=None)
    history = trainer.train(callback=lambda metrics: None)   # warm start (stage 0), then per-step metric dicts
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import time
from pathlib import Path

import torch

from rerule.loss import group_advantages
from rerule.refusal import is_refusal
from rerule.train import checkpoint as ckpt
from rerule.train import distributed
from rerule.train.buffer import ReplayBuffer, ReplayGroup, admit_groups
from rerule.train.config import TrainConfig
from rerule.train.model import (
    autocast_dtype,
    base_model,
    disable_dropout,
    load_model,
)
from rerule.train.rewards import make_reward_fn
from rerule.train.rollout import (
    FreshGroups,
    SeqBatch,
    behavior_logps,
    encode_prompts,
    format_prompts,
    generate,
    use_chat_template,
)
from rerule.train.run_files import RunFiles
from rerule.train.sampling import PromptSampler
from rerule.train.update import UPDATE_METRICS, PolicyUpdate, UpdateSet, collate_replay
from rerule.train.warm_start import warm_start

log = logging.getLogger(__name__)


def resolve_task(cfg):
    """The config's task through ``rerule.data.load_task`` (imported here, so a config can be checked
    without the data package)."""
    from rerule.data import load_task

    try:
        return load_task(cfg.name, forget=cfg.forget, data_dir=cfg.data_dir, **cfg.kwargs)
    except (OSError, FileNotFoundError) as e:
        raise ValueError(f"task {cfg.name!r}: cannot load its data ({e})") from e


def _mean(values):
    values = list(values)
    return float(sum(values) / len(values)) if values else None


class Trainer(RunFiles):
    """RULE / ReRULE training (see the module docstring).

    Args:
        config: a validated TrainConfig.
        model, tokenizer: an AutoModelForCausalLM (+ tokenizer) to train instead of loading
            ``config.model`` (pass both or neither).
        task: an UnlearningTask-like object (``.forget``, ``.boundary`` lists of records with
            ``.prompt``, ``.answer``, ``.subject``, ``.source``); default: ``config.task``.
        reward_fn: ``fn(completions, records) -> list[float]``; default: ``config.reward``'s RULE variant.
        evaluate_fn: ``fn(trainer) -> dict`` called every ``config.eval_every`` steps; its values are
            logged as ``eval/<key>``.
        resume: continue from the newest intact checkpoint in ``output_dir/checkpoints``; True raises
            ValueError when there is none, ``"auto"`` then starts from scratch.
    """

    def __init__(
        self,
        config: TrainConfig,
        model=None,
        tokenizer=None,
        task=None,
        *,
        reward_fn=None,
        evaluate_fn=None,
        resume: bool = False,
    ):
        if not isinstance(config, TrainConfig):
            raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}")
        if (model is None) != (tokenizer is None):
            raise ValueError("pass model and tokenizer together (or neither, to load config.model)")
        self.config = config
        # Data before model: a missing dataset fails before minutes of model loading.
        self._init_task(task, reward_fn)
        self.evaluate_fn = evaluate_fn
        resume_from = self._init_run(resume)
        self._init_model(model, tokenizer)
        self._init_policy(resume_from)
        self._init_update()
        if not self._warm_pending:
            self._prepare_policy(resuming=resume_from is not None)
        self.step = 0
        # boundary prompts whose latest fresh group refused on every completion (the collapse regime)
        self.collapsed: set[int] = set()
        self._rng: dict | None = None
        self.history: list[dict] = []
        self.time_total = 0.0
        self._tb = None
        if resume_from is not None:
            self._load(resume_from)

    def _init_task(self, task, reward_fn) -> None:
        """The prompt pool (forget + boundary prompts) and the reward function."""
        c = self.config
        self.task = task if task is not None else resolve_task(c.task)
        self.pool = list(self.task.forget) + list(self.task.boundary)
        if not self.pool:
            raise ValueError("the task has no forget or boundary prompts to train on")
        if c.rollout.prompts_per_step > len(self.pool):
            raise ValueError(
                f"rollout.prompts_per_step ({c.rollout.prompts_per_step}) exceeds the task's "
                f"{len(self.pool)} forget + boundary prompts"
            )
        self.reward_fn = reward_fn or make_reward_fn(c.reward.variant, c.reward.rouge_threshold, task=c.task.name)

    def _init_run(self, resume):
        """This process's place in the run (device, seed, output directory); the checkpoint to resume from."""
        c = self.config
        # One process: Dist() with identity helpers. Launched by accelerate / torchrun: this rank's place.
        self.dist = distributed.setup(c.distributed, c.device)
        self.device = self.dist.device(c.device)
        self.seed = self.dist.seed(c.seed)
        self.out_dir = Path(c.output_dir)
        self.ckpt_dir = self.out_dir / "checkpoints"
        if self.dist.is_main:
            ckpt.check_writable(self.out_dir)  # before minutes of model loading
        resume_from = self.dist.check_resume(ckpt.latest_checkpoint(self.ckpt_dir) if resume else None)
        if resume and resume_from is None:
            if resume != "auto":
                raise ValueError(
                    f"--resume: no checkpoint under {self.ckpt_dir} (use --resume auto to train "
                    f"from scratch when there is none)"
                )
            log.warning("--resume auto: no checkpoint under %s, starting from scratch", self.ckpt_dir)
        return resume_from

    def _init_model(self, model, tokenizer) -> None:
        """The policy and tokenizer (loaded from ``config.model`` or taken as given) and the encoded prompts."""
        c = self.config
        if model is None:
            bpe = c.model.name_or_path == "tiny" and c.model.tiny.tokenizer == "bpe"
            corpus = self.task.corpus() if bpe and hasattr(self.task, "corpus") else None
            place = self.dist.load_device(self.device)
            model, tokenizer, self.model_info = load_model(c.model, self.device, corpus=corpus, seed=c.seed,
                                                           place=place)
        else:
            disable_dropout(model)
            model = model.to(self.dist.load_device(self.device))
            if tokenizer.pad_token_id is None:
                tokenizer.pad_token = tokenizer.eos_token
            lora = hasattr(model, "peft_config")
            self.model_info = {"model": type(base_model(model)).__name__, "device": str(self.device), "lora": lora}
        self.model, self.tokenizer = model, tokenizer
        self.lora = hasattr(model, "peft_config")
        self.amp = autocast_dtype(c.model, self.device)
        self.loss_impl = self._loss_impl()
        self.model_info["loss_impl"] = self.loss_impl

        chat = use_chat_template(tokenizer, c.rollout.chat_template)
        texts = format_prompts(tokenizer, self.pool, self.task, c.rollout.chat_template)
        self.prompt_ids = encode_prompts(tokenizer, texts, c.rollout.max_prompt_length, chat)

    def _init_policy(self, resume_from) -> None:
        """Shard the policy; the warm start (stage 0, ``run_warm_start``) is pending unless resuming."""
        c = self.config
        # FSDP: a CPU copy for the reference before sharding; the warm start then runs on the shards.
        self._template = (
            copy.deepcopy(self.model) if self.dist.fsdp_on and c.loss.beta > 0 and not self.lora else None
        )
        self.model = self.dist.shard(self.model)
        self.warm_start_stats: dict = {}
        self._warm_pending = resume_from is None and c.warm_start.epochs > 0
        # built by _prepare_policy (here, or after the warm start when one is pending)
        self.reference = self.train_forward = self.update = None

    def run_warm_start(self) -> dict:
        """Stage 0: the SFT warm start (when pending: not on resume, not with ``warm_start.epochs=0``), then
        the KL reference (a copy of the warm-started policy) and the policy update. ``train`` and
        ``train_step`` call it first; it runs once. Returns ``warm_start_stats``."""
        if self._warm_pending:
            c = self.config
            self.warm_start_stats = warm_start(
                self.model, self.tokenizer, self.task, c.warm_start, max_prompt_length=c.rollout.max_prompt_length,
                chat_template=c.rollout.chat_template, amp_dtype=self.amp, seed=c.seed,
                kernel_impl=c.loss.kernel_impl,
            )
            self._warm_pending = False
            self._prepare_policy(resuming=False)
        return self.warm_start_stats

    def _prepare_policy(self, resuming: bool) -> None:
        """After the warm start (or without one): sync the replicas, build the KL reference, wrap the policy
        for the distributed forward and build the policy update."""
        self.dist.sync_replicas(self.model)
        self.reference = self._build_reference(resuming, self._template)
        self._template = None
        self.train_forward = self.dist.wrap(self.model, hidden=self.loss_impl == "fused_linear")
        c, r = self.config, self.config.replay
        self.update = PolicyUpdate(
            self.model, self._loss_kwargs, loss_impl=self.loss_impl, kernel_impl=c.loss.kernel_impl, amp_dtype=self.amp,
            rows_per_micro=self.micro_rows, cap=r.cap, lam=r.lam, advantages=r.advantages,
            dist=self.dist if self.dist.enabled else None, forward=self.train_forward,
            replay_normalize=r.normalize, scale=c.loss.scale_rewards,
        )

    def _init_update(self) -> None:
        """The optimizer, the replay buffer, the prompt sampler and the loss settings of the policy update."""
        c, o, r, s = self.config, self.config.optim, self.config.replay, self.config.sampling
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, o.lr, o.betas, o.eps, weight_decay=o.weight_decay)
        self.buffer = ReplayBuffer(
            capacity=r.capacity, threshold=r.threshold, threshold_mode=r.threshold_mode, quantile=r.quantile,
            quantile_window=r.quantile_window, eviction=r.eviction, staleness=r.staleness,
            max_reuse=r.max_reuse, sampling=r.sampling, priority_floor=r.priority_floor, seed=self.seed + 1,
            sources=r.sources,
        )
        self.sampler = PromptSampler(len(self.pool), s.mode, s.floor, s.alpha, seed=self.seed + 2)
        loss_kwargs = dict(
            temperature=c.rollout.temperature, epsilon_low=c.loss.epsilon_low, epsilon_high=c.loss.epsilon_high,
            dual_clip=c.loss.dual_clip, beta=c.loss.beta, loss_type=c.loss.loss_type,
            importance_sampling_level=c.loss.importance_sampling_level,
        )
        if c.loss.loss_type == "dr_grpo":
            loss_kwargs["max_completion_length"] = c.rollout.max_new_tokens
        # only replayed rows carry behavior log-probs, so this changes nothing for fresh rows
        loss_kwargs["is_weight_kl"] = r.weight_kl
        self.micro_rows = o.micro_batch_groups * c.rollout.group_size if o.micro_batch_groups else None
        self._loss_kwargs = loss_kwargs

    @contextlib.contextmanager
    def _rng_scope(self):
        """Run with the trainer's own torch RNG (generate samples from the global one), so two trainers
        in one process (the demo's arms) do not perturb each other and a checkpoint restores it exactly."""
        cuda = self.device.type == "cuda"
        index = None
        if cuda:
            index = self.device.index if self.device.index is not None else torch.cuda.current_device()
        with torch.random.fork_rng(devices=[index] if cuda else []):
            if self._rng is None:
                torch.manual_seed(self.seed)
            else:
                torch.set_rng_state(self._rng["cpu"])
                if cuda:
                    torch.cuda.set_rng_state(self._rng["cuda"], index)
            yield
            self._rng = {"cpu": torch.get_rng_state()}
            if cuda:
                self._rng["cuda"] = torch.cuda.get_rng_state(index)

    def _loss_impl(self) -> str:
        want = self.config.loss.loss_impl
        if self.dist.fsdp_on:
            # The lm_head weight is sharded under FSDP: the loss takes the logits of the sharded forward.
            if want == "fused_linear":
                raise ValueError("loss.loss_impl=fused_linear is not available under FSDP; use auto or logits")
            return "logits"
        if want == "logits":
            return want
        return "fused_linear" if (want == "fused_linear" or self.device.type == "cuda") else "logits"

    def train(self, callback=None) -> list[dict]:
        """Run until ``config.steps``; ``callback(metrics)`` after each step (return True to stop early).
        Returns the metric history (one dict per step)."""
        from tqdm.auto import tqdm

        c = self.config
        self.run_warm_start()
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._open_logs()
        bar = tqdm(total=c.steps, initial=self.step, disable=not (c.progress and self.dist.is_main), desc="rerule")
        try:
            while self.step < c.steps:
                metrics = self.train_step()
                bar.update(1)
                bar.set_postfix_str(self._postfix(metrics))
                if c.save_every and self.step % c.save_every == 0 and self.step < c.steps:
                    self.save_checkpoint()
                # Every rank runs the callback; one rank asking to stop stops them all (in step).
                if self.dist.any(callback is not None and callback(metrics)):
                    break
        finally:
            bar.close()
        self.save_checkpoint()
        if c.save_final:
            self.save_pretrained(self.out_dir / "final")
        if self._tb is not None:
            self._tb.flush()
        return self.history

    def train_step(self) -> dict:
        """One RL step (see the module docstring); returns its metrics."""
        self.run_warm_start()
        with self._rng_scope():
            return self._train_step()

    def _train_step(self) -> dict:
        c, step = self.config, self.step
        t0 = time.perf_counter()
        hybrid = c.replay.enabled and step >= c.replay.start_step
        self.model.train()
        fresh = self._rollout()  # 1. prompts and rollouts
        t_rollout = time.perf_counter() - t0
        fresh_set = self._score(fresh)  # 2. rewards and group advantages
        replayed, replay_set = self._draw_replay(step, hybrid)  # 3. replayed groups (hybrid stage)
        t1 = time.perf_counter()
        fresh_logps, stats, grad_norm = self._update(fresh_set, replay_set)  # 4. L_on + lambda * L_replay
        t_update = time.perf_counter() - t1
        admitted, evicted_solved = self._update_buffer(fresh, fresh_logps, step)  # 5. buffer and sampler
        self.step += 1
        if "is_weight_mean" in stats:
            self.buffer.record_is_weights(stats["is_weight_mean"], stats["is_ess"])
        t_step = time.perf_counter() - t0
        self.time_total += t_step
        m = {  # 6. metrics
            "step": self.step,
            "stage": "hybrid" if hybrid else "on_policy",
            **self._rollout_metrics(fresh, replayed, admitted, evicted_solved),
            **{k: stats.get(k) for k in UPDATE_METRICS},
            "grad_norm": grad_norm,
            "lr": self.optimizer.param_groups[0]["lr"],
            "generated_tokens": fresh.generated_tokens,
            "train_tokens": int(stats["train_tokens"]),
            "completion_length": fresh.completion_length,
            "time_rollout_s": t_rollout,
            "time_update_s": t_update,
            "time_step_s": t_step,
            "time_total_s": self.time_total,
        }
        if self.evaluate_fn is not None and c.eval_every and self.step % c.eval_every == 0:
            m.update({f"eval/{k}": v for k, v in self.evaluate_fn(self).items()})
        m = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in m.items()}
        self.history.append(m)
        self._log(m)
        return m

    def _rollout(self) -> FreshGroups:
        """Sample this step's prompts and G completions of each."""
        c, G, P = self.config, self.config.rollout.group_size, self.config.rollout.prompts_per_step
        idx = self.sampler.sample(P)
        records = [self.pool[i] for i in idx for _ in range(G)]
        batch, texts = generate(
            self.model, self.tokenizer, [self.prompt_ids[i] for i in idx], G, temperature=c.rollout.temperature,
            top_p=c.rollout.top_p, max_new_tokens=c.rollout.max_new_tokens, amp_dtype=self.amp,
            batch_groups=c.rollout.generation_batch_groups, synced_gpus=self.dist.fsdp_on,
        )
        return FreshGroups(idx=idx, records=records, batch=batch, texts=texts)

    def _score(self, fresh: FreshGroups) -> UpdateSet:
        """Rewards, group advantages and reference log-probs of the fresh groups (filled into ``fresh``)."""
        c, G, P = self.config, self.config.rollout.group_size, self.config.rollout.prompts_per_step
        rewards = torch.tensor(self.reward_fn(fresh.texts, fresh.records), dtype=torch.float32)
        if rewards.shape != (P * G,) or not torch.isfinite(rewards).all():
            raise ValueError(f"reward_fn must return {P * G} finite floats, got {tuple(rewards.shape)}")
        fresh.rewards = rewards
        fresh.advantages = group_advantages(rewards, G, c.loss.scale_rewards)
        fresh.means = rewards.reshape(P, G).mean(1)
        fresh.ref = self._ref_logps(fresh.batch) if c.loss.beta > 0 else None
        return UpdateSet(fresh.batch, fresh.advantages.to(self.device), rewards.to(self.device), None, fresh.ref, G)

    def _draw_replay(self, step: int, hybrid: bool) -> tuple[list[ReplayGroup], UpdateSet | None]:
        """The replayed groups of a hybrid step, and their collated update set."""
        c = self.config
        replayed = []
        if hybrid and c.replay.fraction > 0:
            n_replay = max(1, round(c.replay.fraction * c.rollout.prompts_per_step))
            replayed = self.buffer.sample(n_replay, step, c.replay.forget_share)
        replay_set = collate_replay(replayed, self.tokenizer.pad_token_id, self.device) if replayed else None
        return replayed, replay_set

    def _update(self, fresh_set: UpdateSet, replay_set: UpdateSet | None) -> tuple[torch.Tensor, dict, float]:
        """One optimizer step on L_on + lambda * L_replay; returns the fresh rows' pre-update log-probs,
        the update's statistics and the gradient norm before clipping."""
        c = self.config
        self.optimizer.zero_grad(set_to_none=True)
        fresh_logps, stats = self.update(fresh_set, replay_set)
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        max_norm = c.optim.grad_clip if c.optim.grad_clip is not None else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        # FSDP: a replicated DTensor (the norm over all shards)
        grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
        self.optimizer.step()
        return fresh_logps, stats, grad_norm

    def _update_buffer(self, fresh: FreshGroups, fresh_logps: torch.Tensor, step: int) -> tuple[int, int]:
        """Evict solved prompts, admit hard groups (behavior = the pre-update log-probs), update the
        prompt sampler. Returns (admitted, evicted_solved)."""
        c, idx, means, G = self.config, fresh.idx, fresh.means, self.config.rollout.group_size
        admitted = evicted_solved = 0
        # Ranks sharing their fresh group means (rerule.train.distributed) see [(keys, means)] of every rank.
        shared = self.dist.enabled and c.distributed.share_group_means
        ranks = self.dist.gather((idx, means.tolist())) if shared else [(idx, means.tolist())]
        others = [g for r, g in enumerate(ranks) if r != self.dist.rank]
        if c.replay.enabled:
            admitted, evicted_solved = admit_groups(
                self.buffer, fresh.rewards.reshape(-1, G), idx, [self.pool[k].source for k in idx],
                lambda hard: [self._replay_group(fresh, fresh_logps, g, step) for g in hard],
                others=others, observed=[x for _, ms in ranks for x in ms], evict_solved=c.replay.evict_solved,
            )
            self.buffer.expire(step + 1)
        for keys, ms in others:
            self.sampler.update(keys, ms)
        self.sampler.update(idx, means.tolist())
        return admitted, evicted_solved

    def _replay_group(self, fresh: FreshGroups, fresh_logps: torch.Tensor, g: int, step: int) -> ReplayGroup:
        """Fresh group ``g`` as a buffer entry."""
        G, key, ref = self.config.rollout.group_size, fresh.idx[g], fresh.ref
        rows = slice(g * G, (g + 1) * G)
        return ReplayGroup(
            key=key, prompt_ids=self.prompt_ids[key].clone(), completion_ids=fresh.batch.completion_ids[rows].cpu(),
            completion_mask=fresh.batch.completion_mask[rows].cpu(), rewards=fresh.rewards[rows].clone(),
            advantages=fresh.advantages[rows].clone(), behavior_logps=fresh_logps[rows].cpu(), step=step,
            ref_logps=None if ref is None else ref[rows].cpu(), source=self.pool[key].source,
        )

    def _rollout_metrics(self, fresh: FreshGroups, replayed: list, admitted: int, evicted_solved: int) -> dict:
        """Rewards, refusal rates, collapse and buffer counters of the step (over the global batch)."""
        G, P, idx = self.config.rollout.group_size, self.config.rollout.prompts_per_step, fresh.idx
        is_forget = [r.source == "forget" for r in fresh.records]
        refusals = [is_refusal(t) for t in fresh.texts]
        all_refuse = [all(refusals[g * G : (g + 1) * G]) for g in range(P)]
        for g, key in enumerate(idx):
            if self.pool[key].source != "forget":
                (self.collapsed.add if all_refuse[g] else self.collapsed.discard)(key)
        lengths = fresh.batch.completion_mask.sum(1)
        n_forget = sum(g.source == "forget" for g in replayed)
        boundary_all_refuse = sum(a for g, a in enumerate(all_refuse) if self.pool[idx[g]].source != "forget")
        counts = {
            "replay_groups": len(replayed), "replay_forget_groups": n_forget,
            "replay_boundary_groups": len(replayed) - n_forget, "boundary_all_refuse_groups": boundary_all_refuse,
            "boundary_collapsed_prompts": len(self.collapsed), "buffer_admitted": admitted,
            "buffer_evicted_solved": evicted_solved,
        }
        buffer_stats, r_all = self.buffer.stats(), fresh.rewards
        if self.dist.enabled:
            # Logged metrics are over the global batch (every rank's rows and buffer), the same on all ranks.
            r_all, is_forget, refusals, lengths = self.dist.gather_rows(fresh.rewards, is_forget, refusals, lengths)
            counts, buffer_stats = self.dist.reduce_counts(counts), self.dist.reduce_buffer_stats(buffer_stats)
        fresh.generated_tokens = int(lengths.sum())
        fresh.completion_length = float(lengths.float().mean())
        forget = [i for i, f in enumerate(is_forget) if f]
        other = [i for i, f in enumerate(is_forget) if not f]
        flat = (r_all.reshape(-1, G) == r_all.reshape(-1, G)[:, :1]).all(1)
        return {
            "reward": float(r_all.mean()),
            "forget_reward": _mean(float(r_all[i]) for i in forget),
            "boundary_reward": _mean(float(r_all[i]) for i in other),
            "forget_refusal_rate": _mean(refusals[i] for i in forget),
            "boundary_refusal_rate": _mean(refusals[i] for i in other),
            "flat_group_frac": float(flat.float().mean()),
            **counts,
            **buffer_stats,
        }

    @torch.no_grad()
    def _ref_logps(self, batch: SeqBatch) -> torch.Tensor:
        c = self.config
        kw = dict(temperature=c.rollout.temperature, impl=c.loss.kernel_impl, amp_dtype=self.amp,
                  chunk_rows=self.micro_rows)
        if self.lora:
            with self.model.disable_adapter():
                return behavior_logps(self.model, batch, **kw)
        return behavior_logps(self.reference, batch, **kw)
