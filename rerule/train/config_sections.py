"""The sections of ``TrainConfig`` (``rerule.train.config``): one dataclass per YAML section, each
validating its own fields in ``__post_init__`` with a ValueError that names the key."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rerule.kernels.options import ADV_SCALES, IS_LEVELS, LOSS_TYPES, LossOptions
from rerule.loss import IMPLS
from rerule.train.rewards import RULE_NAMES, VARIANTS

TASKS = ("synthetic", "tofu", "muse", "rwku", "custom")
# "auto": by task (rwku -> two_stage_target, muse / tofu / synthetic -> two_stage); RULE's own names also work.
REWARD_VARIANTS = ("auto", *VARIANTS, *(name for name in RULE_NAMES.values() if name not in VARIANTS))


def _help(text: str, default=dataclasses.MISSING, factory=dataclasses.MISSING):
    if factory is not dataclasses.MISSING:
        return field(default_factory=factory, metadata={"help": text})
    return field(default=default, metadata={"help": text})


def _check(cond: bool, name: str, message: str):
    if not cond:
        raise ValueError(f"config: {name} {message}")


def _positive(name: str, value, allow_zero: bool = False):
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value >= 0 if allow_zero else value > 0)
    _check(ok, name, f"must be a finite number {'>= 0' if allow_zero else '> 0'}, got {value!r}")


def _choice(name: str, value, choices):
    _check(value in choices, name, f"must be one of {tuple(choices)}, got {value!r}")


def _int(name: str, value, low: int, optional: bool = False):
    if optional and value is None:
        return
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= low
    _check(ok, name, f"must be {'None or ' if optional else ''}an int >= {low}, got {value!r}")


@dataclass
class TinyModelConfig:
    """A tiny Llama built from scratch (tests, CPU demo)."""

    hidden_size: int = _help("model width", 64)
    intermediate_size: int = _help("MLP width", 128)
    num_layers: int = _help("decoder layers", 2)
    num_heads: int = _help("attention heads", 4)
    num_kv_heads: int = _help("key/value heads (GQA)", 2)
    max_position_embeddings: int = _help("longest prompt + completion", 512)
    tokenizer: str = _help("'char' (printable ASCII, 1 token/char) or 'bpe' (trained on the task)", "char")
    bpe_vocab_size: int = _help("vocab size of the trained BPE tokenizer", 512)

    def __post_init__(self):
        for name in ("hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
                     "max_position_embeddings", "bpe_vocab_size"):
            _int(f"model.tiny.{name}", getattr(self, name), 1)
        _check(self.hidden_size % self.num_heads == 0, "model.tiny.hidden_size", "must divide by num_heads")
        _check(self.num_heads % self.num_kv_heads == 0, "model.tiny.num_heads", "must divide by num_kv_heads")
        _choice("model.tiny.tokenizer", self.tokenizer, ("char", "bpe"))


@dataclass
class LoraConfig:
    """LoRA adapters through PEFT; the KL reference is then the adapter-disabled base."""

    enabled: bool = _help("train LoRA adapters instead of all weights", False)
    r: int = _help("LoRA rank", 16)
    alpha: float = _help("LoRA alpha (scale = alpha / r)", 32.0)
    dropout: float = _help("LoRA dropout (0 keeps behavior log-probs exact)", 0.0)
    target_modules: Any = _help("PEFT target_modules: 'all-linear' or a list of module names", "all-linear")

    def __post_init__(self):
        _int("model.lora.r", self.r, 1)
        _positive("model.lora.alpha", self.alpha)
        _check(0 <= self.dropout < 1, "model.lora.dropout", f"must be in [0, 1), got {self.dropout!r}")


@dataclass
class ModelConfig:
    name_or_path: str = _help("Hugging Face id or local path of an AutoModelForCausalLM, or 'tiny'", "tiny")
    tokenizer: str | None = _help("tokenizer id/path (default: name_or_path; tiny: tiny.tokenizer)", None)
    tiny: TinyModelConfig = _help("shape of the tiny Llama (name_or_path: tiny)", factory=TinyModelConfig)
    dtype: str = _help("parameters: auto (fp32 master weights; bf16 base under LoRA on CUDA), float32, "
                       "bfloat16, float16", "auto")
    autocast: str = _help("autocast: auto (bf16 on CUDA, off on CPU), bfloat16, float16, none", "auto")
    attn_implementation: str = _help("auto (flash_attention_2 when installed and usable, else sdpa), sdpa, "
                                     "eager, flash_attention_2", "auto")
    liger: str = _help("Liger's RMSNorm/SwiGLU/RoPE kernels on CUDA: auto (if installed), on, off", "auto")
    gradient_checkpointing: bool = _help("recompute activations in backward to save memory", False)
    trust_remote_code: bool = _help("passed to from_pretrained", False)
    lora: LoraConfig = _help("LoRA settings", factory=LoraConfig)

    def __post_init__(self):
        _check(isinstance(self.name_or_path, str) and self.name_or_path, "model.name_or_path", "is empty")
        _choice("model.dtype", self.dtype, ("auto", "float32", "bfloat16", "float16"))
        _choice("model.autocast", self.autocast, ("auto", "bfloat16", "float16", "none"))
        attn = ("auto", "sdpa", "eager", "flash_attention_2")
        _choice("model.attn_implementation", self.attn_implementation, attn)
        _choice("model.liger", self.liger, ("auto", "on", "off"))


@dataclass
class TaskConfig:
    name: str = _help(f"benchmark, one of {TASKS} (resolved by rerule.data.load_task); custom: your own "
                      "forget / boundary / retain files (schema: rerule.data.custom, README)", "synthetic")
    forget: str | None = _help("forget split: TOFU forget01/05/10, MUSE books/news; custom: a hub dataset id "
                               "(when data_dir is None)", None)
    data_dir: str | None = _help("local directory of the benchmark's files (None: the hub); custom: a folder "
                                 "of forget/boundary/retain .jsonl/.csv/.parquet files or a datasets folder",
                                 None)
    kwargs: dict = _help("extra loader arguments, e.g. {hardness: 0.8, seed: 0} for synthetic; custom: "
                         "{forget: f.jsonl, boundary: b.csv, retain: r.parquet} (paths)", factory=dict)

    def __post_init__(self):
        _choice("task.name", self.name, TASKS)
        _check(isinstance(self.kwargs, dict), "task.kwargs", "must be a mapping")
        if self.data_dir is not None:
            msg = f"{self.data_dir!r} does not exist (missing data: fetch it, or drop data_dir)"
            _check(Path(self.data_dir).is_dir(), "task.data_dir", msg)
        if self.name == "custom" and self.data_dir is None and not self.forget and "forget" not in self.kwargs:
            raise ValueError("config: task.name=custom needs task.data_dir (a folder with forget.jsonl ...), "
                             "task.kwargs.forget (a file) or task.forget (a hub dataset id)")


@dataclass
class RolloutConfig:
    group_size: int = _help("completions per prompt (G); advantages are normalized within a group", 8)
    prompts_per_step: int = _help("fresh prompts per step (the batch is prompts_per_step * group_size)", 32)
    temperature: float = _help("sampling temperature; the loss uses the same tau", 1.0)
    top_p: float = _help("nucleus sampling; < 1 makes the sampler differ from the policy in the loss", 1.0)
    max_new_tokens: int = _help("longest completion", 64)
    max_prompt_length: int = _help("prompts are cut from the left to this many tokens", 512)
    chat_template: str = _help("auto (use the tokenizer's chat template when it has one), on, off", "auto")
    generation_batch_groups: int | None = _help("groups per generate call (None: all at once)", None)

    def __post_init__(self):
        if not (isinstance(self.group_size, int) and self.group_size >= 2):
            raise ValueError(f"config: rollout.group_size must be an int >= 2 (a group of one has zero "
                             f"advantage), got {self.group_size!r}")
        _int("rollout.prompts_per_step", self.prompts_per_step, 1)
        _positive("rollout.temperature", self.temperature)
        _check(0 < self.top_p <= 1, "rollout.top_p", f"must be in (0, 1], got {self.top_p!r}")
        _int("rollout.max_new_tokens", self.max_new_tokens, 1)
        _int("rollout.max_prompt_length", self.max_prompt_length, 1)
        _choice("rollout.chat_template", self.chat_template, ("auto", "on", "off"))
        _int("rollout.generation_batch_groups", self.generation_batch_groups, 1, optional=True)


@dataclass
class RewardConfig:
    variant: str = _help(f"auto (by task: rwku two_stage_target, else two_stage) or a RULE variant "
                         f"(docs/benchmarks.md), one of {REWARD_VARIANTS[1:]}", "auto")
    rouge_threshold: float | None = _help("ROUGE-L recall threshold (None: the variant's, 0.3 or 0.5)", None)

    def __post_init__(self):
        _choice("reward.variant", self.variant, REWARD_VARIANTS)
        if self.rouge_threshold is not None:
            _check(0 <= self.rouge_threshold <= 1, "reward.rouge_threshold", "must be in [0, 1]")


@dataclass
class OptimConfig:
    lr: float = _help("AdamW learning rate (RULE: 2e-6 Llama, 3e-6 Qwen; a tiny model needs ~1e-3)", 2e-6)
    weight_decay: float = _help("AdamW weight decay", 0.01)
    betas: tuple = _help("AdamW betas", (0.9, 0.999))
    eps: float = _help("AdamW eps", 1e-8)
    grad_clip: float | None = _help("max global grad norm (None: no clipping)", 1.0)
    micro_batch_groups: int | None = _help("groups per forward/backward (grad accumulation; None: all)", None)

    def __post_init__(self):
        _positive("optim.lr", self.lr)
        _positive("optim.weight_decay", self.weight_decay, allow_zero=True)
        _positive("optim.eps", self.eps)
        self.betas = tuple(self.betas)
        ok = len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas)
        _check(ok, "optim.betas", "must be 2 numbers in [0, 1)")
        if self.grad_clip is not None:
            _positive("optim.grad_clip", self.grad_clip)
        _int("optim.micro_batch_groups", self.micro_batch_groups, 1, optional=True)


@dataclass
class LossConfig:
    beta: float = _help("k3 KL coefficient against the warm-start reference (0: no reference model)", 1e-2)
    epsilon_low: float = _help("PPO clip low", 0.2)
    epsilon_high: float = _help("PPO clip high", 0.3)
    dual_clip: float | None = _help("dual clip c > 1 for negative advantages (None: off)", 3.0)
    loss_type: str = _help(f"normalizer, one of {LOSS_TYPES} (TRL's definitions)", "grpo")
    importance_sampling_level: str = _help("token or sequence (GSPO) ratio", "token")
    scale_rewards: str = _help(f"advantage scale, one of {ADV_SCALES}", "group")
    loss_impl: str = _help("auto (fused_linear on CUDA, else logits), fused_linear, logits", "auto")
    kernel_impl: str = _help(f"backend of the loss kernels, one of {IMPLS}", "auto")

    def __post_init__(self):
        _choice("loss.loss_type", self.loss_type, LOSS_TYPES)
        _choice("loss.importance_sampling_level", self.importance_sampling_level, IS_LEVELS)
        _choice("loss.scale_rewards", self.scale_rewards, ADV_SCALES)
        _choice("loss.loss_impl", self.loss_impl, ("auto", "fused_linear", "logits"))
        _choice("loss.kernel_impl", self.kernel_impl, IMPLS)
        try:
            LossOptions(epsilon_low=self.epsilon_low, epsilon_high=self.epsilon_high, beta=self.beta,
                        dual_clip=self.dual_clip, loss_type=self.loss_type,
                        importance_sampling_level=self.importance_sampling_level)
        except (TypeError, ValueError) as e:
            raise ValueError(f"config: loss: {e}") from None


@dataclass
class ReplayConfig:
    enabled: bool = _help("ReRULE (true) or plain RULE (false) on the same code path", True)
    start_step: int = _help("first step that replays (steps before it are the on-policy stage)", 2)
    fraction: float = _help("replayed groups per step / prompts_per_step (at least 1 group when > 0)", 0.125)
    lam: float = _help("lambda: loss = L_on + lambda * L_replay (YAML key 'lambda' or 'lam')", 1.0)
    cap: float = _help("truncation of w = min(pi_old / mu, cap) on replayed tokens", 2.0)
    normalize: str = _help("batch: L_on and L_replay share one normalizer over fresh + replayed rows, so "
                           "lambda=1 weighs a replayed row like a fresh one; replay: L_replay is a mean over "
                           "its own rows (each replayed row then weighs ~1/fraction fresh ones)", "batch")
    weight_kl: bool = _help("w also weighs the k3 KL term of replayed tokens (else its gradient "
                            "beta*(1 - ref/pi) is unbounded where the policy left a replayed token)", True)
    advantages: str = _help("replayed groups' estimator: consistent (self-normalized truncated sequence "
                            "weights p_i = min(pi/mu, cap) / sum give the baseline, the std AND the row weight "
                            "G * p_i, so a group's weighted advantages sum to 0; docs/replay.md), recomputed "
                            "(ablation: p_i baseline, row weight 1, biased) or stored", "consistent")
    sources: str = _help("which groups may be replayed: both, forget or boundary", "both")
    forget_share: float | None = _help("share of each step's replay slots for forget groups, the rest for "
                                       "boundary groups (null: drawn from the buffer as it is)", None)
    threshold: float = _help("admit a group when its mean reward is under this (absolute mode)", 0.5)
    threshold_mode: str = _help("absolute, or quantile (running quantile of recent group means)", "absolute")
    quantile: float = _help("quantile of the running threshold", 0.25)
    quantile_window: int = _help("how many recent group means the running quantile looks at", 512)
    capacity: int = _help("most groups the buffer holds", 256)
    eviction: str = _help("when full, drop the oldest group or the highest-reward group", "oldest")
    staleness: int = _help("drop groups older than this many steps", 16)
    max_reuse: int = _help("drop a group after it has been replayed this many times", 4)
    sampling: str = _help("uniform or prioritized (toward low group reward) draws from the buffer", "uniform")
    priority_floor: float = _help("prioritized buffer draws: weight = floor + (1 - mean reward)", 0.1)
    evict_solved: bool = _help("drop a prompt's groups once its latest fresh group scores >= threshold", True)

    def __post_init__(self):
        _int("replay.start_step", self.start_step, 0)
        for name in ("capacity", "staleness", "max_reuse", "quantile_window"):
            _int(f"replay.{name}", getattr(self, name), 1)
        ok = isinstance(self.fraction, (int, float)) and 0 <= self.fraction <= 4
        _check(ok, "replay.fraction", f"must be in [0, 4], got {self.fraction!r}")
        _positive("replay.lambda", self.lam, allow_zero=True)
        _positive("replay.cap", self.cap)
        _choice("replay.advantages", self.advantages, ("consistent", "recomputed", "stored"))
        _choice("replay.sources", self.sources, ("both", "forget", "boundary"))
        if self.forget_share is not None:
            ok = isinstance(self.forget_share, (int, float)) and 0 <= self.forget_share <= 1
            _check(ok, "replay.forget_share", f"must be null or in [0, 1], got {self.forget_share!r}")
        _choice("replay.normalize", self.normalize, ("batch", "replay"))
        _choice("replay.threshold_mode", self.threshold_mode, ("absolute", "quantile"))
        _check(0 < self.quantile < 1, "replay.quantile", f"must be in (0, 1), got {self.quantile!r}")
        _check(math.isfinite(self.threshold), "replay.threshold", "must be a finite number")
        _choice("replay.eviction", self.eviction, ("oldest", "highest_reward"))
        _choice("replay.sampling", self.sampling, ("uniform", "prioritized"))
        _positive("replay.priority_floor", self.priority_floor)


@dataclass
class SamplingConfig:
    mode: str = _help("prompt sampling: uniform, or prioritized toward prompts whose last group scored low "
                      "(an on-policy curriculum, independent of replay)", "uniform")
    floor: float = _help("prioritized: weight = (floor + 1 - last group mean)^alpha (rewards in [0, 1])", 0.1)
    alpha: float = _help("prioritized: sharpness of the weights", 1.0)

    def __post_init__(self):
        _choice("sampling.mode", self.mode, ("uniform", "prioritized"))
        _positive("sampling.floor", self.floor)
        _positive("sampling.alpha", self.alpha)


@dataclass
class WarmStartConfig:
    epochs: float = _help("stage 0 SFT epochs (RULE: 3); 0 skips the warm start", 0.0)
    mode: str = _help("rejection_steering (RULE's: refusals naming the subject for forget_fraction of the "
                      "forget prompts, nothing else) or with_answers (those refusals plus the reference "
                      "answers of every boundary prompt)", "with_answers")
    forget_fraction: float = _help("share of forget prompts given a refusal target (RULE: 0.2)", 0.2)
    batch_size: int = _help("SFT batch size", 8)
    lr: float = _help("SFT learning rate (RULE: 4e-7), cosine schedule", 4e-7)
    warmup_steps: int = _help("SFT linear warm-up steps", 20)

    def __post_init__(self):
        _positive("warm_start.epochs", self.epochs, allow_zero=True)
        _choice("warm_start.mode", self.mode, ("rejection_steering", "with_answers"))
        _check(0 <= self.forget_fraction <= 1, "warm_start.forget_fraction", "must be in [0, 1]")
        _int("warm_start.batch_size", self.batch_size, 1)
        _positive("warm_start.lr", self.lr)
        _int("warm_start.warmup_steps", self.warmup_steps, 0)


@dataclass
class DistributedConfig:
    """Multi-process runs (``accelerate launch`` / ``torchrun``; see ``rerule.train.distributed``). Ignored in a
    single process. ``rollout.prompts_per_step`` is per rank: the global batch is world_size times it."""

    strategy: str = _help("auto (fsdp when accelerate launched with an FSDP config, else ddp), ddp, fsdp",
                          "auto")
    share_group_means: bool = _help("every rank sees all ranks' fresh group means: the quantile admission "
                                    "threshold, solved-prompt eviction and prioritized prompt sampling act "
                                    "on the global batch, as in one process", True)
    timeout_s: int = _help("collective timeout in seconds (a rank that stops answering fails the run)", 1800)

    def __post_init__(self):
        _choice("distributed.strategy", self.strategy, ("auto", "ddp", "fsdp"))
        _int("distributed.timeout_s", self.timeout_s, 1)
