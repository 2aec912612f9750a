"""What a ``Trainer`` writes and reads back: ``run_info.json``, ``metrics.jsonl`` (and TensorBoard),
checkpoints, resume from a checkpoint, the final ``save_pretrained``. A mixin of ``Trainer``; it
uses the trainer's model, optimizer, buffer, sampler, RNG state and history."""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

from rerule.train import checkpoint as ckpt
from rerule.train.config import TrainConfig
from rerule.train.model import load_trainable_state_dict

log = logging.getLogger("rerule.train.trainer")


class RunFiles:
    """Logs, checkpoints and resume of a ``Trainer`` (see the module docstring)."""

    def _open_logs(self) -> None:
        if not self.dist.is_main:
            return
        if self.config.tensorboard != "off" and self._tb is None:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(self.out_dir / "tensorboard"))
            except ImportError:
                if self.config.tensorboard == "on":
                    raise ValueError("tensorboard=on but tensorboard is not installed: pip install tensorboard "
                                     "(or pip install -e '.[tensorboard]' in the clone)") from None
                log.info("tensorboard is not installed: metrics go to metrics.jsonl only (pip install tensorboard)")
        (self.out_dir / "run_info.json").write_text(
            json.dumps(
                {
                    "model": self.model_info,
                    "warm_start": self.warm_start_stats,
                    "config": self.config.to_dict(),
                },
                indent=1,
                default=str,
            )
        )

    def _log(self, m: dict) -> None:
        if not self.dist.is_main:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        with open(self.out_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(m) + "\n")
        if self._tb is not None:
            for k, v in m.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    self._tb.add_scalar(k, v, m["step"])

    @staticmethod
    def _postfix(m: dict) -> str:
        def f(v):
            return "-" if v is None else f"{v:.2f}"

        return (
            f"reward={f(m['reward'])} forget={f(m['forget_reward'])} boundary={f(m['boundary_reward'])} "
            f"refuse={f(m['forget_refusal_rate'])} buf={m['buffer_size']} w={f(m['is_weight_mean'])}"
        )

    def state(self) -> dict:
        return {
            "step": self.step,
            "history": self.history,
            "buffer": self.buffer.state_dict(),
            "sampler": self.sampler.state_dict(),
            "rng": self._rng,
            "config": self.config.to_dict(),
            "time_total": self.time_total,
            "warm_start": self.warm_start_stats,
            "collapsed": sorted(self.collapsed),
        }

    def save_checkpoint(self) -> Path:
        """Write model, optimizer and trainer state atomically to output_dir/checkpoints/step-N. In a
        multi-process run every rank calls it: rank 0 writes those, each rank its buffer-rank{r}.pt."""
        if self.dist.enabled:
            return self.dist.save_training(self.model, self.optimizer, self.state(), self.ckpt_dir, self.step,
                                           self.config.keep_checkpoints)
        parts = {"optimizer": self.optimizer.state_dict(), "state": self.state()}

        def write_weights(directory):
            # Hugging Face format: `rerule eval --model <checkpoint>` and from_pretrained load it as it is.
            self.model.save_pretrained(directory, safe_serialization=True)
            self.tokenizer.save_pretrained(directory)

        return ckpt.save_checkpoint(self.ckpt_dir, self.step, parts, keep=self.config.keep_checkpoints,
                                    write_weights=write_weights)

    def _load(self, path: Path) -> None:
        parts = ckpt.load_checkpoint(path, map_location="cpu")
        if self.dist.enabled:
            # FSDP-aware weights and optimizer, and this rank's buffer, sampler and RNG from its shard
            self.dist.load_training(self.model, self.optimizer, path, parts)
        else:
            load_trainable_state_dict(self.model, parts["model"])
            self.optimizer.load_state_dict(parts["optimizer"])
        s = parts["state"]
        warm = s.get("warm_start", {}).get("warm_start_steps", 0) > 0
        ref_file = self.out_dir / "reference.pt"
        if warm and self.reference is not None and not self.dist.fsdp_on and not ref_file.is_file():
            raise ckpt.CheckpointError(f"{ref_file} is missing: the run was warm-started, so its KL reference "
                                       f"cannot be rebuilt from the initial model")
        saved = TrainConfig.from_dict(s["config"]).to_dict()
        changed = [
            k
            for k in saved
            if k not in ("steps", "progress", "save_every", "eval_every")
            and saved[k] != self.config.to_dict()[k]
        ]
        if changed:
            log.warning("resuming with a config that differs from the checkpoint's in: %s", changed)
        self.step, self.history, self.time_total = s["step"], list(s["history"]), s["time_total"]
        self.warm_start_stats = s.get("warm_start", {})
        self.collapsed = set(s.get("collapsed", []))
        self.buffer.load_state_dict(s["buffer"])
        self.sampler.load_state_dict(s["sampler"])
        self._rng = s["rng"]
        # Rows written after the checkpoint (by the killed run) are dropped: the log restarts from it.
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if self.dist.is_main:
            ckpt.atomic_write_text(
                self.out_dir / "metrics.jsonl", "".join(json.dumps(m) + "\n" for m in self.history)
            )
        log.info("resumed from %s at step %d", path, self.step)

    def save_pretrained(self, path: str | Path) -> Path:
        """save_pretrained the policy (the adapter under LoRA) and tokenizer, atomically (rank 0; under FSDP
        every rank joins in gathering the weights)."""
        import os
        import shutil

        path = Path(path)
        full = {"state_dict": self.dist.full_state_dict(self.model)} if self.dist.fsdp_on else {}
        if self.dist.is_main:
            tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
            shutil.rmtree(tmp, ignore_errors=True)
            self.model.save_pretrained(tmp, **full)
            self.tokenizer.save_pretrained(tmp)
            if path.exists():
                shutil.rmtree(path)
            os.replace(tmp, path)
        self.dist.barrier()
        return path

    def _build_reference(self, resuming: bool, template=None):
        """The frozen KL reference: a copy of the warm-started policy, or the adapter-disabled base (LoRA)."""
        if self.config.loss.beta == 0 or self.lora:
            return None
        path = self.out_dir / "reference.pt"
        if self.dist.fsdp_on:
            warm = self.warm_start_stats.get("warm_start_steps", 0) > 0
            return self.dist.fsdp_reference(template, self.model, path, resuming, warm, self.amp)
        ref = copy.deepcopy(self.model)
        warm = self.warm_start_stats.get("warm_start_steps", 0) > 0
        if resuming and path.is_file():
            ref.load_state_dict(ckpt.load_file(path, map_location=self.device))
        elif self.dist.is_main and warm:
            ckpt.atomic_save({k: v.detach().cpu() for k, v in ref.state_dict().items()}, path)
        # Without a warm start the reference is the initial model, which the config (or the caller) rebuilds
        # on resume: it is not stored again. _load checks that a warm-started run's reference.pt is there.
        if self.amp is not None:
            ref = ref.to(self.amp)
        ref.eval()
        for p in ref.parameters():
            p.requires_grad_(False)
        return ref
