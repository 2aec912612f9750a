"""Models and tokenizers: any AutoModelForCausalLM, or a tiny Llama for tests and the CPU demo.

``load_model(config.model, device, corpus)`` returns ``(model, tokenizer, info)``:

- ``name_or_path: tiny`` builds a small Llama from ``model.tiny`` with a character-level tokenizer
  (printable ASCII) or a byte-level BPE trained on the task's corpus;
- anything else goes through ``AutoModelForCausalLM.from_pretrained`` / ``AutoTokenizer``.

Choices made here (and reported in ``info``, which the trainer logs):

- precision: fp32 master weights by default, with bf16 autocast on CUDA. RULE's lr of 2e-6 moves a
  bf16 weight by less than its resolution, so pure-bf16 training would silently drop updates. Under
  LoRA on CUDA the frozen base is bf16 and PEFT keeps the adapters in fp32.
- attention: flash_attention_2 when flash-attn is installed, the device is CUDA and the weights
  are half precision (it has no fp32 kernel); SDPA otherwise (on CUDA, SDPA itself dispatches to a
  flash kernel under bf16 autocast).
- Liger's model kernels (RMSNorm, SwiGLU, RoPE) on CUDA when liger-kernel is installed; Liger's
  cross-entropy patches stay off because the loss is ours.
- dropout is switched off: the behaviour log-probs of a rollout must be what the policy assigned.
"""

from __future__ import annotations

import importlib.util
import logging

import torch

from rerule.config import ModelConfig, TinyModelConfig

log = logging.getLogger(__name__)

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>")
CHARS = tuple(chr(i) for i in range(32, 127)) + ("\n",)


def _fast_tokenizer(tk):
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    bos = tk.token_to_id("<s>")
    tk.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    tok.padding_side = "left"
    return tok


def build_char_tokenizer():
    """A character-level tokenizer over printable ASCII + newline (ids 0-3 are <pad> <s> </s> <unk>).

    Example:
        >>> tok = build_char_tokenizer()
        >>> tok.decode(tok("Hi!", add_special_tokens=False)["input_ids"])
        'Hi!'
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS + CHARS)}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    # Fuse joins tokens without separators (WordLevel's default decoder puts spaces between them).
    tk.decoder = decoders.Fuse()
    return _fast_tokenizer(tk)


def build_bpe_tokenizer(corpus: str, vocab_size: int = 512):
    """A byte-level BPE tokenizer trained on ``corpus`` (deterministic for a given corpus)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tk.train_from_iterator(corpus.split("\n"), trainer=trainer)
    return _fast_tokenizer(tk)


def build_tiny_llama(vocab_size: int, tiny: TinyModelConfig | None = None, seed: int = 0, tokenizer=None):
    """A randomly initialized LlamaForCausalLM of the ``tiny`` shape, seeded (same seed, same weights)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tiny = tiny or TinyModelConfig()
    ids = {}
    if tokenizer is not None:
        ids = {
            "pad_token_id": tokenizer.pad_token_id,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
        }
    cfg = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=tiny.hidden_size,
        intermediate_size=tiny.intermediate_size,
        num_hidden_layers=tiny.num_layers,
        num_attention_heads=tiny.num_heads,
        num_key_value_heads=tiny.num_kv_heads,
        max_position_embeddings=tiny.max_position_embeddings,
        tie_word_embeddings=False,
        **ids,
    )
    cpu_rng = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = LlamaForCausalLM(cfg)
    finally:
        # Building the model must not move the global RNG that sampling depends on.
        torch.random.set_rng_state(cpu_rng)
    return model


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} but CUDA is not available")
    return dev


def autocast_dtype(cfg: ModelConfig, device: torch.device) -> torch.dtype | None:
    """The dtype forwards autocast to, or None for no autocast."""
    if cfg.autocast == "none" or (cfg.autocast == "auto" and device.type != "cuda"):
        return None
    if cfg.autocast == "auto":
        return torch.bfloat16
    return getattr(torch, cfg.autocast)


def _param_dtype(cfg: ModelConfig, device: torch.device) -> torch.dtype:
    if cfg.dtype != "auto":
        return getattr(torch, cfg.dtype)
    return torch.bfloat16 if (cfg.lora.enabled and device.type == "cuda") else torch.float32


def _attn_impl(cfg: ModelConfig, device: torch.device, dtype: torch.dtype) -> str:
    if cfg.attn_implementation != "auto":
        return cfg.attn_implementation
    half = dtype in (torch.bfloat16, torch.float16)
    if device.type == "cuda" and half and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def disable_dropout(model: torch.nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    cfg = getattr(model, "config", None)
    for name in ("attention_dropout", "hidden_dropout", "dropout", "resid_pdrop", "attn_pdrop", "embd_pdrop"):
        if cfg is not None and isinstance(getattr(cfg, name, None), float):
            setattr(cfg, name, 0.0)


def _apply_liger(cfg: ModelConfig, model, device: torch.device) -> bool:
    if cfg.liger == "off" or device.type != "cuda":
        if cfg.liger == "on" and device.type != "cuda":
            log.warning("model.liger=on ignored: Liger's kernels need CUDA")
        return False
    if importlib.util.find_spec("liger_kernel") is None:
        if cfg.liger == "on":
            raise ValueError("model.liger=on but liger-kernel is not installed (pip install liger-kernel)")
        return False
    from liger_kernel.transformers.monkey_patch import (
        MODEL_TYPE_TO_APPLY_LIGER_FN,
        _apply_liger_kernel_to_instance,
    )

    if model.config.model_type not in MODEL_TYPE_TO_APPLY_LIGER_FN:
        return False
    _apply_liger_kernel_to_instance(
        model=model,
        rms_norm=True,
        swiglu=True,
        rope=True,
        cross_entropy=False,
        fused_linear_cross_entropy=False,
    )
    return True


def load_model(cfg: ModelConfig, device: torch.device, corpus: str | None = None, seed: int = 0,
               place: torch.device | None = None):  # fmt: skip
    """Build or load the policy. Returns (model, tokenizer, info) with the model on ``place`` (default ``device``).

    Args:
        cfg: the config's ``model`` section.
        device: where the model runs (decides dtype, attention and Liger).
        corpus: text to train a BPE tokenizer on (``name_or_path: tiny`` with ``tiny.tokenizer: bpe``).
        seed: initializes the tiny model.
        place: where the weights are put now (FSDP loads on the CPU; sharding moves them to ``device``).
    """
    dtype = _param_dtype(cfg, device)
    if cfg.name_or_path == "tiny":
        if cfg.tiny.tokenizer == "bpe":
            if not corpus:
                raise ValueError("model.tiny.tokenizer=bpe needs the task's corpus to train on")
            tokenizer = build_bpe_tokenizer(corpus, cfg.tiny.bpe_vocab_size)
        else:
            tokenizer = build_char_tokenizer()
        model = build_tiny_llama(len(tokenizer), cfg.tiny, seed=seed, tokenizer=tokenizer)
        model.config._attn_implementation = _attn_impl(cfg, device, dtype)
        model = model.to(dtype)
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(
            cfg.tokenizer or cfg.name_or_path, trust_remote_code=cfg.trust_remote_code
        )
        model = AutoModelForCausalLM.from_pretrained(
            cfg.name_or_path,
            dtype=dtype,
            attn_implementation=_attn_impl(cfg, device, dtype),
            trust_remote_code=cfg.trust_remote_code,
        )
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    disable_dropout(model)
    liger = _apply_liger(cfg, model, device)
    model = model.to(place or device)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if cfg.lora.enabled:
        from peft import LoraConfig, get_peft_model

        target = cfg.lora.target_modules
        model = get_peft_model(
            model,
            LoraConfig(
                r=cfg.lora.r,
                lora_alpha=cfg.lora.alpha,
                lora_dropout=cfg.lora.dropout,
                target_modules=list(target) if isinstance(target, (list, tuple)) else target,
                task_type="CAUSAL_LM",
            ),
        )
        if cfg.gradient_checkpointing:
            model.enable_input_require_grads()
    info = {
        "model": cfg.name_or_path,
        "device": str(device),
        "param_dtype": str(dtype).replace("torch.", ""),
        "autocast": str(autocast_dtype(cfg, device)).replace("torch.", ""),
        "attn_implementation": base_model(model).config._attn_implementation,
        "liger": liger,
        "lora": cfg.lora.enabled,
        "gradient_checkpointing": cfg.gradient_checkpointing,
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "vocab_size": base_model(model).get_output_embeddings().weight.shape[0],
    }
    log.info("model: %s", info)
    return model, tokenizer, info


def base_model(model):
    """The underlying transformers model (unwraps a PEFT model)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def trainable_state_dict(model) -> dict[str, torch.Tensor]:
    """What a checkpoint stores: the adapter under LoRA, every parameter and buffer otherwise."""
    if hasattr(model, "peft_config"):
        from peft import get_peft_model_state_dict

        return {k: v.detach().cpu().clone() for k, v in get_peft_model_state_dict(model).items()}
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def load_trainable_state_dict(model, state: dict[str, torch.Tensor]) -> None:
    if hasattr(model, "peft_config"):
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(model, state)
        if getattr(result, "unexpected_keys", None):
            raise ValueError(f"adapter checkpoint has unexpected keys: {result.unexpected_keys[:5]}")
        return
    model.load_state_dict(state, strict=True)
