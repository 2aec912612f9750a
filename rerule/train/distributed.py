"""Multi-GPU and multi-node training on torch.distributed, launched by ``accelerate launch`` or ``torchrun``.

    accelerate launch --num_processes 8 -m rerule train --config x.yaml                    # DDP
    accelerate launch --config_file rerule/configs/accelerate_fsdp.yaml -m rerule train --config x.yaml
    torchrun --nproc_per_node 8 -m rerule train --config x.yaml                            # DDP

The trainer calls ``setup`` once. Without ``WORLD_SIZE`` > 1 in the environment it returns a ``Dist``
whose helpers are identities, and the trainer runs exactly its single-process code.

Data parallel with rollouts kept local: each rank samples its own prompts from the whole pool (under
its own seed), generates and scores its own groups and keeps its own replay buffer. No rollout, text
or buffer entry crosses ranks: generation dominates an RL step and needs no communication this way;
a stored group's behavior and reference log-probs stay on the rank that computed them; there is no
shared buffer to keep consistent or to ship on every step. What is reduced across ranks:

- gradients (DDP all-reduce, or FSDP2 reduce-scatter);
- the loss normalizers: the global number of sequences (grpo, dr_grpo) and tokens (bnpo, dapo's
  ``num_items_in_batch``), so that the rank-averaged gradient is the one-process gradient of the
  whole global batch (``per_rank_totals``);
- metrics: rollout metrics over all ranks' rows, token-weighted loss metrics, buffer counts;
- optionally (``distributed.share_group_means``, on by default) the fresh group means, so the quantile
  admission threshold, solved-prompt eviction and prioritized prompt sampling see the global batch.

Normalization. DDP averages gradients over W ranks, so each rank's loss is W times its share of the
global loss: a micro-batch of b rows / n tokens is scaled by b / (B_global / W) (grpo, dr_grpo) or
n / (N_global / W) (bnpo), and dapo divides by ``num_items_in_batch = N_global / W`` (TRL does the same).
The mean over ranks of the per-rank losses is the global loss, and so is its gradient.

Micro-batches. Ranks may hold different numbers of replayed rows, hence of micro-batches. Under DDP
every micro-batch but the last runs under ``no_sync`` (each rank does exactly one synced backward).
Under FSDP every forward and backward is a collective, so ranks with fewer micro-batches run extra
zero-loss passes, and generation uses ``synced_gpus``.

Seeds. Rank r samples with ``seed + r * RANK_SEED_STRIDE`` (rank 0 keeps the config's seed, so its
stream is the single-process one); the model's initialization and the warm start use the shared seed.

Checkpoints. ``save_checkpoint`` writes one directory: rank 0 writes model, optimizer and the shared
state, every rank writes ``buffer-rank{r}.pt`` (its buffer, prompt sampler and RNG) into the same
temporary directory; after a barrier rank 0 renames it into place. A rank killed at any point leaves
the previous complete checkpoint. Resume needs the same world size and strategy.
"""

from __future__ import annotations

import contextlib
import datetime
import inspect
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from rerule.train import checkpoint as ckpt
from rerule.train.model import base_model, load_trainable_state_dict, resolve_device, trainable_state_dict
from rerule.train.rollout import SeqBatch, completion_hidden, completion_logits

log = logging.getLogger(__name__)

RANK_SEED_STRIDE = 1_000_003
# Per-rank update sums that add up over ranks; the losses are averaged (see the module docstring).
# Trainer state that is each rank's own: written to buffer-rank{r}.pt, not to the shared state.pt.
RANK_LOCAL = ("buffer", "sampler", "rng")


def shard_name(rank: int) -> str:
    return f"buffer-rank{rank}.pt"


@dataclass
class Dist:
    """Where this process stands in the run. ``Dist()`` is the single process (every helper an identity)."""

    world_size: int = 1
    rank: int = 0
    local_rank: int = 0
    strategy: str = "none"
    comm_device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    fsdp: dict = field(default_factory=dict)

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def fsdp_on(self) -> bool:
        return self.strategy == "fsdp"

    def device(self, spec: str) -> torch.device:
        """The training device: ``resolve_device(spec)`` in one process, cuda:LOCAL_RANK (or cpu) otherwise."""
        if not self.enabled:
            return resolve_device(spec)
        return self.comm_device

    def seed(self, base: int) -> int:
        return base + RANK_SEED_STRIDE * self.rank

    # -- collectives (identities in one process) ------------------------------------------------------

    def _reduce(self, values, op) -> list[float]:
        if not self.enabled:
            return [float(v) for v in values]
        t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=self.comm_device)
        torch.distributed.all_reduce(t, op=op)
        return t.tolist()

    def all_sum(self, values) -> list[float]:
        return self._reduce(values, torch.distributed.ReduceOp.SUM if self.enabled else None)

    def all_max(self, values) -> list[float]:
        return self._reduce(values, torch.distributed.ReduceOp.MAX if self.enabled else None)

    def gather(self, obj) -> list:
        """[obj of rank 0, obj of rank 1, ...] on every rank (small picklable objects)."""
        if not self.enabled:
            return [obj]
        out = [None] * self.world_size
        torch.distributed.all_gather_object(out, obj)
        return out

    def broadcast(self, obj):
        """Rank 0's ``obj`` on every rank."""
        if not self.enabled:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def any(self, flag) -> bool:
        return bool(flag) if not self.enabled else self.all_max([bool(flag)])[0] > 0

    def barrier(self) -> None:
        if self.enabled:
            torch.distributed.barrier()

    # -- the update ----------------------------------------------------------------------------------

    def per_rank_totals(self, rows: list[float], tokens: list[float]) -> tuple[list[float], list[float]]:
        """Global rows and tokens per set (fresh, replay) divided by W: the normalizers that make each
        rank's scaled loss W times its share of the global loss (module docstring)."""
        flat = self.all_sum(list(rows) + list(tokens))
        k = len(rows)
        return [x / self.world_size for x in flat[:k]], [x / self.world_size for x in flat[k:]]

    def micro_steps(self, n_local: int) -> int:
        """Micro-batch passes this rank runs: its own count (DDP), the largest count over ranks (FSDP)."""
        return int(self.all_max([n_local])[0]) if self.fsdp_on else n_local

    def sync_context(self, module, last: bool):
        """Gradient sync only on the last micro-batch: DDP ``no_sync`` before it, FSDP2's
        ``set_requires_gradient_sync``."""
        if self.strategy == "ddp" and not last:
            return module.no_sync()
        if self.fsdp_on:
            module.set_requires_gradient_sync(last)
        return contextlib.nullcontext()

    def reduce_update(self, stats) -> None:
        """Sum the update's per-rank sums (``UpdateStats.sums``), average its scaled losses, max its largest
        weight (in place)."""
        values = self.all_sum(stats.sums() + [stats.fresh.loss, stats.replay.loss])
        stats.set_sums(values[:-2])
        stats.fresh.loss, stats.replay.loss = values[-2] / self.world_size, values[-1] / self.world_size
        stats.weights.w_max = self.all_max([stats.weights.w_max])[0]

    # -- metrics -------------------------------------------------------------------------------------

    def gather_rows(self, rewards: torch.Tensor, is_forget: list, refusals: list, lengths: torch.Tensor):
        """This step's rollout rows from every rank, in rank order."""
        parts = self.gather((rewards.cpu(), list(is_forget), list(refusals), lengths.cpu()))
        return (torch.cat([p[0] for p in parts]), [x for p in parts for x in p[1]],
                [x for p in parts for x in p[2]], torch.cat([p[3] for p in parts]))

    def reduce_counts(self, counts: dict) -> dict:
        return dict(zip(counts, (int(round(v)) for v in self.all_sum(list(counts.values())))))

    def reduce_buffer_stats(self, stats: dict) -> dict:
        """Sizes add up; mean reward is size-weighted; threshold and IS effective sample size averaged."""
        n = stats["buffer_size"]
        mean = stats["buffer_mean_reward"]
        ess = stats["buffer_ess_ema"]
        has_ess = ess == ess
        s = self.all_sum([n, stats["buffer_forget"], stats["buffer_boundary"], n * mean if n else 0.0,
                          stats["buffer_threshold"], ess if has_ess else 0.0, float(has_ess)])
        return {
            "buffer_size": int(s[0]),
            "buffer_forget": int(s[1]),
            "buffer_boundary": int(s[2]),
            "buffer_mean_reward": s[3] / s[0] if s[0] else float("nan"),
            "buffer_threshold": s[4] / self.world_size,
            "buffer_ess_ema": s[5] / s[6] if s[6] else float("nan"),
        }

    # -- model placement -----------------------------------------------------------------------------

    def load_device(self, device: torch.device) -> torch.device:
        """Where weights are loaded: the device, or the CPU under FSDP (sharding then moves them)."""
        return torch.device("cpu") if self.fsdp_on else device

    def shard(self, model):
        """FSDP2: ``fully_shard`` every transformer block (the model's ``_no_split_modules``, or the
        accelerate config's class names), then the root. Other strategies: the model unchanged."""
        if not self.fsdp_on:
            return model
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(self.comm_device.type, (self.world_size,))
        names = self.fsdp.get("layer_classes") or list(getattr(base_model(model), "_no_split_modules", None) or [])
        kw = {"mesh": mesh, "reshard_after_forward": self.fsdp.get("reshard_after_forward", True)}
        if self.fsdp.get("offload_policy") is not None:
            kw["offload_policy"] = self.fsdp["offload_policy"]
        blocks = [m for m in model.modules() if type(m).__name__ in set(names)]
        if not blocks:
            raise ValueError(f"FSDP: no module of the classes {names} to shard (set the model's "
                             "_no_split_modules or fsdp_transformer_layer_cls_to_wrap)")
        for m in blocks:
            fully_shard(m, **kw)
        fully_shard(model, **kw)
        return model

    def sync_replicas(self, model) -> None:
        """DDP: give every rank rank 0's weights (the replicated warm start need not be bitwise equal
        across GPUs), before the reference is copied from them."""
        if self.strategy != "ddp":
            return
        with torch.no_grad():
            for t in list(model.parameters()) + list(model.buffers()):
                torch.distributed.broadcast(t.data, src=0)

    def wrap(self, model, hidden: bool):
        """The module the update's forward goes through: DDP around ``CompletionScorer`` (so DDP's forward
        arms its gradient hooks even for the hidden-state path); None (use the model) otherwise."""
        if self.strategy != "ddp":
            return None
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.comm_device.index] if self.comm_device.type == "cuda" else None
        # No buffer sync in forward: ranks run different numbers of forwards per step (replayed rows
        # differ), and a broadcast in each forward would pair up across steps.
        no_sync = {"broadcast_buffers": False}
        if "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters:
            no_sync = {"forward_sync_buffers": False}
        return DistributedDataParallel(CompletionScorer(model, hidden), device_ids=ids, **no_sync)

    # -- state ---------------------------------------------------------------------------------------

    def model_state(self, model) -> dict | None:
        """The checkpointed weights (see ``trainable_state_dict``) on rank 0, None elsewhere; under FSDP
        gathered from the shards (a collective: every rank calls it)."""
        if not self.fsdp_on:
            return trainable_state_dict(model) if self.is_main else None
        full = self.full_state_dict(model)
        if not self.is_main:
            return None
        if hasattr(model, "peft_config"):
            keep = {n for n, p in model.named_parameters() if p.requires_grad}
            full = {k: v for k, v in full.items() if k in keep}
        return full

    @staticmethod
    def full_state_dict(model) -> dict:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def load_model_state(self, model, state: dict) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        strict = not hasattr(model, "peft_config")
        set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, strict=strict))

    def optimizer_state(self, model, optimizer) -> dict | None:
        if not self.fsdp_on:
            return optimizer.state_dict() if self.is_main else None
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        state = get_optimizer_state_dict(model, optimizer, options=opts)
        return state if self.is_main else None

    def load_optimizer_state(self, model, optimizer, state: dict) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))

    def fsdp_reference(self, template, model, path: Path, resuming: bool, warm_started: bool, amp_dtype):
        """The frozen KL reference under FSDP: ``template`` (a CPU copy of the policy taken before it was
        sharded) loaded with the reference weights, then sharded the same way."""
        if resuming and path.is_file():
            template.load_state_dict(ckpt.load_file(path))
            full = None
        else:
            full = self.full_state_dict(model) if warm_started else template.state_dict()
            if self.is_main:
                ckpt.atomic_save({k: v.detach().cpu() for k, v in full.items()}, path)
        if amp_dtype is not None:
            template = template.to(amp_dtype)
        ref = self.shard(template)
        if full is not None and warm_started:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

            opts = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
            set_model_state_dict(ref, full if self.is_main else {}, options=opts)
        ref.eval()
        for p in ref.parameters():
            p.requires_grad_(False)
        return ref

    def save_checkpoint(self, root, step: int, parts: dict | None, shard: dict, keep: int) -> Path:
        """Rank 0 writes ``parts`` and every rank its ``shard`` into one temporary directory, renamed
        into place by rank 0 only after all of them are on disk (a barrier)."""
        tmp = self.broadcast(str(ckpt.begin_checkpoint(root, step)) if self.is_main else None)
        if self.is_main:
            for name, obj in parts.items():
                ckpt.atomic_save(obj, Path(tmp) / f"{name}.pt")
        ckpt.atomic_save(shard, Path(tmp) / shard_name(self.rank))
        self.barrier()
        final = str(ckpt.commit_checkpoint(root, tmp, step, keep)) if self.is_main else None
        # Also a barrier: no rank goes on (or reads the checkpoint) before the rename.
        return Path(self.broadcast(final))

    def save_training(self, model, optimizer, state: dict, root, step: int, keep: int) -> Path:
        """A multi-process checkpoint of training (every rank calls it): rank 0 writes the model, the
        optimizer and ``state`` (a trainer's ``state()``) less its rank-local parts, each rank those parts."""
        state = dict(state)
        shard = {k: state.pop(k) for k in RANK_LOCAL}
        shard.update(rank=self.rank, world_size=self.world_size)
        state.update(world_size=self.world_size, strategy=self.strategy)
        parts = {"model": self.model_state(model), "optimizer": self.optimizer_state(model, optimizer),
                 "state": state}
        return self.save_checkpoint(root, step, parts, shard, keep)

    def load_training(self, model, optimizer, path: Path, parts: dict) -> None:
        """Load ``parts`` (model, optimizer, state) into ``model`` and ``optimizer``, and this rank's
        shard into ``parts["state"]``."""
        if self.fsdp_on:
            self.load_model_state(model, parts["model"])
            self.load_optimizer_state(model, optimizer, parts["optimizer"])
        else:
            load_trainable_state_dict(model, parts["model"])
            optimizer.load_state_dict(parts["optimizer"])
        parts["state"].update({k: v for k, v in self.load_shard(path).items() if k in RANK_LOCAL})

    def load_shard(self, path: Path) -> dict:
        file = Path(path) / shard_name(self.rank)
        if not file.is_file():
            raise ValueError(f"checkpoint {str(path)!r} has no {file.name} for rank {self.rank}")
        return ckpt.load_file(file)

    def check_resume(self, path: Path | None) -> Path | None:
        """Rank 0's choice of checkpoint, refused with a clear message when it was written by another
        world size or strategy (each rank's buffer, sampler and RNG are its own shard)."""
        path = self.broadcast(None if path is None else str(path))
        if path is None:
            return None
        state = ckpt.load_file(Path(path) / "state.pt")
        saved = state.get("world_size", 1)
        if saved != self.world_size:
            raise ValueError(
                f"cannot resume from {path}: it was written by {saved} process(es) and this run has "
                f"{self.world_size}. Each rank's replay buffer, prompt sampler and RNG are its own shard "
                f"(buffer-rank<r>.pt), so resume needs the same world size: relaunch with {saved} "
                f"process(es) in all, or train into a new output_dir."
            )
        strategy = state.get("strategy", "none")
        if saved > 1 and strategy != self.strategy:
            raise ValueError(f"cannot resume from {path}: it was written under distributed.strategy="
                             f"{strategy} and this run uses {self.strategy}")
        return Path(path)


class CompletionScorer(torch.nn.Module):
    """The update's forward as one module (what DDP wraps): completion logits [B, T, V], or the last
    hidden states [B, T, H] for the fused-linear loss."""

    def __init__(self, model, hidden: bool):
        super().__init__()
        self.model, self.hidden = model, hidden

    def forward(self, prompt_ids, prompt_mask, completion_ids, completion_mask):
        batch = SeqBatch(prompt_ids, prompt_mask, completion_ids, completion_mask)
        return completion_hidden(self.model, batch) if self.hidden else completion_logits(self.model, batch)


def _fsdp_from_accelerate() -> dict:
    """FSDP settings from an ``accelerate launch --config_file`` FSDP config (its environment)."""
    from accelerate.utils import FullyShardedDataParallelPlugin
    from torch.distributed.fsdp import CPUOffloadPolicy

    plugin = FullyShardedDataParallelPlugin()
    if plugin.fsdp_version != 2:
        raise ValueError("rerule shards with FSDP2 (fully_shard): set fsdp_version: 2 in the accelerate config")
    if plugin.activation_checkpointing:
        raise ValueError("fsdp_activation_checkpointing: use rerule's model.gradient_checkpointing: true instead")
    names = plugin.transformer_cls_names_to_wrap
    return {
        "reshard_after_forward": bool(plugin.reshard_after_forward),
        "layer_classes": [names] if isinstance(names, str) else list(names or []),
        "offload_policy": plugin.cpu_offload if isinstance(plugin.cpu_offload, CPUOffloadPolicy) else None,
    }


def setup(cfg, device: str = "auto") -> Dist:
    """Join the process group when launched with several processes (``accelerate launch``, ``torchrun``:
    ``WORLD_SIZE`` > 1), through accelerate's ``PartialState``; a single process gets ``Dist()``.

    Args:
        cfg: the config's ``distributed`` section; device: the config's ``device`` ("cpu" forces gloo).
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    from accelerate import PartialState

    cpu = device == "cpu" or not torch.cuda.is_available()
    if device.startswith("cuda") and cpu:
        raise ValueError(f"device={device!r} but CUDA is not available")
    kwargs = {"backend": "gloo"} if cpu else {}
    state = PartialState(cpu=cpu, timeout=datetime.timedelta(seconds=cfg.timeout_s), **kwargs)
    if not torch.distributed.is_initialized() or state.num_processes != world:
        raise RuntimeError(f"WORLD_SIZE={world} but the process group did not start ({state.distributed_type})")
    use_fsdp = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    strategy = cfg.strategy if cfg.strategy != "auto" else ("fsdp" if use_fsdp else "ddp")
    comm = torch.device("cpu") if cpu else torch.device("cuda", state.local_process_index)
    dist = Dist(world_size=world, rank=state.process_index, local_rank=state.local_process_index,
                strategy=strategy, comm_device=comm,
                fsdp=_fsdp_from_accelerate() if strategy == "fsdp" and use_fsdp else {})
    if not dist.is_main:
        # One copy of the run's log lines: rank 0's (the others still warn).
        logging.getLogger("rerule").setLevel(logging.WARNING)
    log.info("distributed: %d processes, strategy %s, backend %s", world, strategy, state.backend)
    return dist
