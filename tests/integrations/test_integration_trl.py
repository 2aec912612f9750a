"""rerule.integrations.trl: parity of FusedGRPOTrainer._compute_loss with TRL's native _compute_loss
(loss, every parameter's gradient, logged metrics) on a tiny fp32 Llama, and short training runs of
FusedGRPOTrainer and ReplayGRPOTrainer.

The configs keep TRL's default use_bias_correction_kl=True (KL x the policy ratio) unless a test
turns it off; test_parity_with_trl runs both."""

from __future__ import annotations

import random

import pytest
import torch
from datasets import Dataset
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
from trl import GRPOTrainer

from rerule import fused_linear_grpo_loss, group_advantages, grpo_loss
from rerule.integrations.trl import FusedGRPOTrainer, ReplayGRPOConfig, ReplayGRPOTrainer
from rerule.kernels.grpo_math import importance_weights
from rerule.train.buffer import ReplayGroup

WORDS = ["<pad>", "<eos>", "<bos>", "<unk>"] + [f"w{i}" for i in range(61)]  # V = 65: not a power of two


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny Llama and a word-level tokenizer saved to disk (TRL rebuilds the reference from a path)."""
    path = tmp_path_factory.mktemp("tiny_llama")
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>", unk_token="<unk>"
    )
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(WORDS),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
        tie_word_embeddings=False,
    )
    LlamaForCausalLM(cfg).save_pretrained(path)
    hf_tok.save_pretrained(path)
    return str(path)


def dataset():
    return Dataset.from_dict(
        {"prompt": [" ".join(f"w{(7 * i + j) % 61}" for j in range(3 + i % 3)) for i in range(8)]}
    )


def random_reward(completions, **kwargs):
    # Deterministic per completion, spread over [0, 1): groups are rarely flat.
    return [random.Random(c).random() for c in completions]


def config(cls=ReplayGRPOConfig, **kw):
    base = dict(
        output_dir="unused",
        per_device_train_batch_size=4,
        num_generations=4,
        max_completion_length=8,
        bf16=False,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        logging_steps=1,
        use_vllm=False,
        beta=0.0,
    )
    return cls(**{**base, **kw})


@pytest.fixture(scope="module")
def trainer(model_dir, tmp_path_factory):
    tr = FusedGRPOTrainer(
        model=model_dir,
        reward_funcs=random_reward,
        processing_class=PreTrainedTokenizerFast.from_pretrained(model_dir),
        args=config(output_dir=str(tmp_path_factory.mktemp("out"))),
        train_dataset=dataset(),
    )
    tr.current_gradient_accumulation_steps = 2
    tr.args.steps_per_generation = 4
    tr.model.train()
    return tr


def make_inputs(tr, seed=0, B=6, P=5, C=7, off_policy=0.3):
    """The dict TRL's _generate_and_score_completions hands to _compute_loss: left-padded prompts,
    right-padded completions of different lengths, old / ref log-probs near the current policy."""
    g = torch.Generator().manual_seed(seed)
    V = tr.model.config.vocab_size
    prompt_ids = torch.randint(4, V, (B, P), generator=g)
    prompt_mask = torch.ones(B, P, dtype=torch.long)
    prompt_mask[0, :2] = 0
    prompt_ids[0, :2] = 0
    completion_ids = torch.randint(4, V, (B, C), generator=g)
    lengths = torch.tensor([C, 3, 5, 1, C, C - 1][:B])
    completion_mask = (torch.arange(C)[None] < lengths[:, None]).long()
    completion_ids[completion_mask == 0] = 0
    with torch.no_grad():
        cur, _, _ = tr._get_per_token_logps_and_entropies(
            tr.model,
            torch.cat([prompt_ids, completion_ids], 1),
            torch.cat([prompt_mask, completion_mask], 1),
            C,
        )
    return dict(
        prompt_ids=prompt_ids,
        prompt_mask=prompt_mask,
        completion_ids=completion_ids,
        completion_mask=completion_mask,
        advantages=torch.randn(B, generator=g),
        # A per-sequence shift as well, so sequence-level (GSPO) ratios clip too.
        old_per_token_logps=cur
        + off_policy * (torch.randn(B, C, generator=g) + torch.randn(B, 1, generator=g)),
        ref_per_token_logps=cur + 0.3 * torch.randn(B, C, generator=g),
        num_items_in_batch=completion_mask.sum() * 3,
    )


def run(tr, fn, inputs):
    tr.model.zero_grad(set_to_none=True)
    for store in tr._metrics.values():
        store.clear()
    loss = fn(tr.model, inputs)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in tr.model.named_parameters() if p.grad is not None}
    mode = "train" if tr.model.training else "eval"
    return loss.detach(), grads, {k: v[-1] for k, v in tr._metrics[mode].items()}


def assert_parity(tr, inputs):
    native = run(tr, lambda m, i: GRPOTrainer._compute_loss(tr, m, i), inputs)
    ours = run(tr, tr._compute_loss, inputs)
    torch.testing.assert_close(ours[0], native[0], rtol=2e-5, atol=1e-7)
    assert set(ours[1]) == set(native[1])
    assert len(native[1]) == sum(p.requires_grad for p in tr.model.parameters())
    for name, g in native[1].items():
        torch.testing.assert_close(
            ours[1][name],
            g,
            rtol=1e-4,
            atol=1e-6 * g.abs().max().item() + 1e-9,
            msg=lambda m, name=name: f"{name}: {m}",
        )
    assert set(ours[2]) == set(native[2])
    for k, v in native[2].items():
        assert ours[2][k] == pytest.approx(v, rel=1e-4, abs=1e-6), k
    return native


_MISSING = object()


@pytest.fixture
def setattrs(trainer):
    saved = {}

    def set_(**kw):
        for k, v in kw.items():
            obj, attr = (trainer.args, k[5:]) if k.startswith("args_") else (trainer, k)
            saved.setdefault((id(obj), attr), (obj, attr, getattr(obj, attr, _MISSING)))
            setattr(obj, attr, v)

    yield set_
    for obj, attr, value in saved.values():
        if value is _MISSING:
            delattr(obj, attr)
        else:
            setattr(obj, attr, value)


def native_loss(tr, model, inputs):
    return GRPOTrainer._compute_loss(tr, model, inputs)


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("beta,kl_is", [(0.0, True), (0.05, False), (0.05, True)],
                         ids=["beta0", "beta-k3", "beta-k3-bias-corrected"])
@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
def test_parity_with_trl(trainer, setattrs, loss_type, beta, kl_is, level):
    setattrs(loss_type=loss_type, beta=beta, importance_sampling_level=level,
             args_use_bias_correction_kl=kl_is)
    native = assert_parity(trainer, make_inputs(trainer, seed=1))
    # The inputs must exercise the clipping branches (else parity would not test them).
    assert native[2]["clip_ratio/region_mean"] > 0
    assert ("kl" in native[2]) == (beta > 0)


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_bias_corrected_kl_is_what_trl_logs_and_differentiates(trainer, setattrs, level):
    """TRL logs kl = mean(k3 x exp(log_ratio)), with the ratio taken before delta clamps it, and its
    gradient carries d ratio / d logp. The inputs make both visible: with delta = 1.2 some ratios
    are clamped, and the plain k3 gives another kl and other gradients."""
    setattrs(loss_type="bnpo", beta=0.2, importance_sampling_level=level, args_delta=1.2,
             args_use_bias_correction_kl=True)
    inputs = make_inputs(trainer, seed=13, off_policy=0.4)
    corrected = assert_parity(trainer, inputs)
    setattrs(args_use_bias_correction_kl=False)
    plain = run(trainer, lambda m, i: native_loss(trainer, m, i), inputs)
    assert abs(corrected[2]["kl"] - plain[2]["kl"]) > 0.05 * plain[2]["kl"]
    g_c, g_p = corrected[1]["lm_head.weight"], plain[1]["lm_head.weight"]
    assert (g_c - g_p).abs().max() > 1e-3 * g_p.abs().max()
    # some ratio is past delta (else the unclamped ratio in the logged kl would go untested)
    m = inputs["completion_mask"].bool()
    with torch.no_grad():
        cur, _, _ = trainer._get_per_token_logps_and_entropies(
            trainer.model, torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1),
            torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1), m.size(1))
    lr = (cur - inputs["old_per_token_logps"]) * m
    if level == "sequence":
        lr = lr.sum(-1) / m.sum(-1)
    assert (lr.exp() > 1.2).any()


@pytest.mark.parametrize("mode", ["token_truncate", "token_mask", "sequence_truncate", "sequence_mask"])
def test_parity_vllm_importance_sampling(trainer, setattrs, mode):
    """TRL's vLLM ratio multiplies the policy term; we pass it as behavior log-probs with no cap."""
    setattrs(loss_type="dapo", beta=0.05, use_vllm=True, vllm_importance_sampling_correction=True)
    inputs = make_inputs(trainer, seed=2)
    g = torch.Generator().manual_seed(3)
    B, C = inputs["completion_ids"].shape
    shape = (B, 1) if mode.startswith("sequence") else (B, C)
    ratio = torch.exp(0.4 * torch.randn(shape, generator=g)).clamp(max=3.0)
    if mode.endswith("mask"):
        ratio[ratio > 1.3] = 0.0  # TRL's mask modes zero the out-of-range ratios
    inputs["importance_sampling_ratio"] = ratio
    assert_parity(trainer, inputs)


class FakeVLLM:
    """Stands in for TRL's VLLMGeneration: fixed completions of 2-6 tokens and sampling log-probs near the
    tiny model's own (~ -log 65), so that TRL's _generate_and_score_completions computes the vLLM
    importance-sampling ratio itself, in every mode, from its own code."""

    def __init__(self, seed):
        self.g = torch.Generator().manual_seed(seed)

    def sync_weights(self):
        pass

    def generate(self, prompts, images, num_generations, profiler):
        comps, logprobs = [], []
        for i, _ in enumerate(prompts):
            ids = torch.randint(4, len(WORDS), (2 + i % 5,), generator=self.g).tolist()
            lps = -4.17 + 0.35 * torch.randn(len(ids), generator=self.g)
            comps.append(ids)
            logprobs.append([[float(x)] for x in lps])
        return prompts, comps, logprobs, None


VLLM_MODES = ["token_truncate", "token_mask", "sequence_truncate", "sequence_mask"]


@pytest.mark.parametrize("loss_type", ["grpo", "dapo"])
@pytest.mark.parametrize("mode", VLLM_MODES)
def test_parity_vllm_modes_from_trl_generation(trainer, setattrs, mode, loss_type):
    """TRL computes importance_sampling_ratio from (fake) vLLM log-probs in each mode with both bounds;
    FusedGRPOTrainer's loss, gradients and metrics match TRL's native _compute_loss on that batch, and
    rerule's own is_mode (behavior_logps = the sampling log-probs) gives TRL's ratio and loss."""
    lo, hi = 0.8, 1.25
    setattrs(loss_type=loss_type, beta=0.0, use_vllm=True, vllm_generation=FakeVLLM(21),
             _last_loaded_step=-1, vllm_importance_sampling_correction=True,
             vllm_importance_sampling_mode=mode, vllm_importance_sampling_clip_min=lo,
             vllm_importance_sampling_clip_max=hi)
    ds = dataset()
    inputs = trainer._generate_and_score_completions([ds[i // 4] for i in range(8)])
    # a KL term too (the module's trainer has no reference model to generate with)
    g = torch.Generator().manual_seed(22)
    inputs["ref_per_token_logps"] = inputs["old_per_token_logps"] + 0.3 * torch.randn(
        inputs["old_per_token_logps"].shape, generator=g)
    setattrs(beta=0.05)
    ratio = inputs["importance_sampling_ratio"]
    assert ratio.shape == ((8, 1) if mode.startswith("sequence") else inputs["completion_ids"].shape)
    valid = inputs["completion_mask"].bool() if mode.startswith("token") else torch.ones_like(ratio, dtype=bool)
    r = ratio[valid]
    # every branch of the mode is exercised: above, below and inside the bounds
    if mode.endswith("truncate"):
        assert (r == hi).any() and (r == lo).any() and ((r > lo) & (r < hi)).any()
    else:
        assert (r == 0).any() and (r > 0).any()
    native = assert_parity(trainer, inputs)

    # rerule's own modes from the sampling log-probs, through the public fused-linear loss
    kw, divisor = trainer._rerule_loss_spec(inputs, inputs["completion_mask"], "train")
    assert divisor == 1 and kw.pop("is_ratio") is ratio
    kw.update(behavior_logps=inputs["sampling_per_token_logps"], is_mode=mode, is_cap=hi, is_cap_min=lo)
    ours = run(trainer, lambda m, i: trainer._rerule_forward(
        m, i, lambda h, w, b: fused_linear_grpo_loss(
            h, w, i["completion_ids"], i["completion_mask"], i["advantages"], bias=b, **kw)).loss, inputs)
    torch.testing.assert_close(ours[0], native[0], rtol=2e-5, atol=1e-7)
    for name, g in native[1].items():
        torch.testing.assert_close(ours[1][name], g, rtol=1e-4, atol=1e-6 * g.abs().max().item() + 1e-9)
    w, _ = importance_weights(inputs["completion_mask"], inputs["old_per_token_logps"],
                              inputs["sampling_per_token_logps"], mode, hi, lo)
    m = inputs["completion_mask"].bool()
    torch.testing.assert_close(w[m], ratio.expand_as(w)[m], rtol=1e-6, atol=0)


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_loss_api_clip_metrics_are_trls(trainer, setattrs, level):
    """grpo_loss's clip_ratio_low / high equal TRL's logged clip_ratio/low_mean / high_mean: means over
    tokens at token level, over sequences at sequence level (where the two differ on these inputs)."""
    setattrs(loss_type="grpo", beta=0.0, importance_sampling_level=level)
    inputs = make_inputs(trainer, seed=14, off_policy=0.5)
    native = run(trainer, lambda m, i: native_loss(trainer, m, i), inputs)[2]
    C = inputs["completion_ids"].size(1)
    with torch.no_grad():
        ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
        attn = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
        logits = trainer.model(input_ids=ids, attention_mask=attn).logits[:, -C - 1 : -1]
    out = grpo_loss(logits, inputs["completion_ids"], inputs["completion_mask"], inputs["advantages"],
                    old_logps=inputs["old_per_token_logps"], importance_sampling_level=level, impl="torch")
    low, high = out.metrics["clip_ratio_low"].item(), out.metrics["clip_ratio_high"].item()
    assert low + high > 0
    assert low == pytest.approx(native["clip_ratio/low_mean"], abs=1e-6)
    assert high == pytest.approx(native["clip_ratio/high_mean"], abs=1e-6)
    if level == "sequence":  # the token-weighted mean would differ here
        m = inputs["completion_mask"].float()
        lr = ((out.logps - inputs["old_per_token_logps"]) * m).sum(-1) / m.sum(-1)
        a = inputs["advantages"]
        tok = ((((lr.exp() < 0.8) & (a < 0)) | ((lr.exp() > 1.2) & (a > 0))).float()[:, None] * m).sum() / m.sum()
        assert abs(tok.item() - (low + high)) > 1e-3


def test_parity_tool_mask_delta_eps_high_and_no_old(trainer, setattrs):
    setattrs(loss_type="grpo", beta=0.05, epsilon_high=0.28, args_delta=1.5)
    inputs = make_inputs(trainer, seed=4)
    tool = torch.ones_like(inputs["completion_mask"])
    tool[0, 2:4] = 0
    inputs["tool_mask"] = tool
    assert_parity(trainer, inputs)
    del inputs["old_per_token_logps"]  # on-policy: ratio 1, gradient of the current log-probs
    assert_parity(trainer, inputs)


def test_parity_eval_mode(trainer, setattrs):
    setattrs(loss_type="dapo")
    trainer.model.eval()
    try:
        assert_parity(trainer, make_inputs(trainer, seed=5))
    finally:
        trainer.model.train()


def _fresh_trainer(model_dir, tmp_path, **kw):
    extra = {k: kw.pop(k) for k in ("peft_config",) if k in kw}
    tok = PreTrainedTokenizerFast.from_pretrained(model_dir)
    args = config(output_dir=str(tmp_path), **kw)
    tr = FusedGRPOTrainer(model=model_dir, reward_funcs=random_reward, args=args, processing_class=tok,
                          train_dataset=dataset(), **extra)
    tr.current_gradient_accumulation_steps = 1
    tr.model.train()
    return tr


def test_parity_peft_lora(model_dir, tmp_path):
    """With LoRA the head hook sits on the wrapped base model; only adapter weights get gradients."""
    from peft import LoraConfig

    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    tr = _fresh_trainer(model_dir, tmp_path, loss_type="dapo", beta=0.05, peft_config=lora)
    with torch.no_grad():  # LoRA B starts at zero; make the adapter active so A gets a gradient too
        for name, p in tr.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    native = assert_parity(tr, make_inputs(tr, seed=11))
    assert native[1] and all("lora" in n for n in native[1])


def test_bf16_model_close_to_native(model_dir, tmp_path):
    """In bf16 TRL's log-probs are bf16 and ours fp32: equal up to bf16 rounding, not bitwise."""
    tr = _fresh_trainer(model_dir, tmp_path, loss_type="grpo", bf16=True,
                        model_init_kwargs={"dtype": "bfloat16"})
    assert tr.model.dtype == torch.bfloat16
    inputs = make_inputs(tr, seed=12)
    native = run(tr, lambda m, i: GRPOTrainer._compute_loss(tr, m, i), inputs)
    ours = run(tr, tr._compute_loss, inputs)
    torch.testing.assert_close(ours[0].float(), native[0].float(), rtol=2e-2, atol=1e-3)
    for name, g in native[1].items():
        scale = g.float().abs().max().item()
        torch.testing.assert_close(ours[1][name].float(), g.float(), rtol=0, atol=0.05 * scale + 1e-6)


def test_unsupported_configurations_raise(trainer, setattrs):
    inputs = make_inputs(trainer, seed=6)
    setattrs(beta=0.0, loss_type="cispo")
    with pytest.raises(ValueError, match="cispo"):
        trainer._compute_loss(trainer.model, inputs)
    setattrs(loss_type="dapo", top_entropy_quantile=0.2)
    with pytest.raises(ValueError, match="top_entropy_quantile"):
        trainer._compute_loss(trainer.model, inputs)


@pytest.mark.parametrize("mode", ["consistent", "recomputed"])
@pytest.mark.parametrize("beta", [0.0, 0.05], ids=["beta0", "beta-bias-corrected-kl"])
def test_replay_loss_is_on_policy_plus_weighted_decoupled_replay(model_dir, tmp_path, beta, mode):
    """ReplayGRPOTrainer's loss on a batch with replayed rows equals L_on(fresh rows) from TRL's
    native loss + lambda * the spec's replay loss (w = min(exp(old - behavior), cap) on the policy term;
    consistent: behavior carries the row weight G * p_i <= G and the cap is G, so it is not truncated
    again; recomputed: the cap is replay_is_cap). beta0: old = current (ratio 1). With beta > 0 (TRL's
    default use_bias_correction_kl=True) old is off the current policy, and the replayed rows' KL is
    k3 x exp(logp - old), not weighted by w."""
    args = config(output_dir=str(tmp_path), loss_type="grpo", beta=beta, replay_weight=0.7, replay_is_cap=1.5,
                  replay_advantages=mode)
    tr = ReplayGRPOTrainer(
        model=model_dir,
        reward_funcs=random_reward,
        processing_class=PreTrainedTokenizerFast.from_pretrained(model_dir),
        args=args,
        train_dataset=dataset(),
    )
    tr.current_gradient_accumulation_steps = 1
    tr.model.train()
    inputs = make_inputs(tr, seed=7)
    if beta == 0.0:
        del inputs["old_per_token_logps"], inputs["ref_per_token_logps"]
    B, C = inputs["completion_ids"].shape
    replay = torch.tensor([False, True, False, True, True, False])
    mu = make_inputs(tr, seed=7, off_policy=0.0)["old_per_token_logps"] + 0.5 * torch.randn(B, C)
    inputs.update(replay_mask=replay, behavior_per_token_logps=mu, replay_num_items=torch.tensor(7.0))

    ours = tr._compute_loss(tr.model, inputs)
    fresh = {
        k: (v[~replay] if torch.is_tensor(v) and v.dim() else v)
        for k, v in inputs.items()
        if k not in ("replay_mask", "behavior_per_token_logps", "replay_num_items")
    }
    on = GRPOTrainer._compute_loss(tr, tr.model, fresh)
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)[replay]
    attn = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)[replay]
    logits = tr.model(input_ids=ids, attention_mask=attn).logits[:, -C - 1 : -1]
    spec = grpo_loss(
        logits,
        inputs["completion_ids"][replay],
        inputs["completion_mask"][replay],
        inputs["advantages"][replay],
        old_logps=inputs["old_per_token_logps"][replay] if beta else None,
        behavior_logps=mu[replay],
        ref_logps=inputs["ref_per_token_logps"][replay] if beta else None,
        beta=beta,
        bias_correction_kl=True,
        is_cap=1.5 if mode == "recomputed" else float(tr.num_generations),
        loss_type="grpo",
    )
    torch.testing.assert_close(ours, on + 0.7 * spec.loss, rtol=1e-5, atol=1e-7)
    if mode == "recomputed":
        assert spec.metrics["is_truncated_frac"] > 0  # the cap is active on these inputs
    assert tr._metrics["train"]["replay/is_truncated_frac"][-1] == pytest.approx(
        spec.metrics["is_truncated_frac"].item(), abs=1e-6
    )


def test_train_runs(model_dir, tmp_path):
    for cls in (FusedGRPOTrainer, ReplayGRPOTrainer):
        args = config(
            output_dir=str(tmp_path / cls.__name__),
            max_steps=3,
            beta=0.04,
            loss_type="dapo",
            learning_rate=1e-3,
            replay_threshold=1.0,
            replay_fraction=1.0,
            replay_start_step=1,
        )
        tr = cls(
            model=model_dir,
            reward_funcs=random_reward,
            processing_class=PreTrainedTokenizerFast.from_pretrained(model_dir),
            args=args,
            train_dataset=dataset(),
        )
        before = {n: p.detach().clone() for n, p in tr.model.named_parameters()}
        tr.train()
        changed = [n for n, p in tr.model.named_parameters() if not torch.equal(before[n], p.detach())]
        assert len(changed) == len(before), cls.__name__
        logs = [h for h in tr.state.log_history if "loss" in h]
        assert len(logs) == 3 and all(torch.isfinite(torch.tensor(h["loss"])) for h in logs)
        assert {"entropy", "kl", "clip_ratio/region_mean", "reward"} <= set(logs[-1])
        if cls is ReplayGRPOTrainer:
            assert tr.replay_buffer.counters["admitted"] >= 1
            assert sum(h["replay/groups"] for h in logs) >= 1 and "replay/is_ess" in logs[-1]


def test_mix_replay_pads_and_recomputes(model_dir, tmp_path):
    """A stored group with a shorter prompt and a longer completion is merged into the fresh batch:
    padding leaves every row's log-probs unchanged, pi_old is the current policy's, and with mu = pi_old
    the recomputed advantages are the plain group advantages."""
    tr = ReplayGRPOTrainer(
        model=model_dir,
        reward_funcs=random_reward,
        args=config(output_dir=str(tmp_path)),
        processing_class=PreTrainedTokenizerFast.from_pretrained(model_dir),
        train_dataset=dataset(),
    )
    tr.model.train()
    out = make_inputs(tr, seed=8)
    g = torch.Generator().manual_seed(9)
    G, P, C = 4, 3, 9
    prompt = torch.randint(4, 65, (P,), generator=g)
    comp = torch.randint(4, 65, (G, C), generator=g)
    cmask = (torch.arange(C)[None] < torch.tensor([C, 4, 6, 2])[:, None]).long()
    ones = torch.ones(G, P, dtype=torch.long)
    mu = tr._policy_logps(prompt.expand(G, P), ones, comp, cmask)
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0])
    group = ReplayGroup(
        key=1,
        prompt_ids=prompt,
        completion_ids=comp,
        completion_mask=cmask,
        rewards=rewards,
        advantages=torch.zeros(G),
        behavior_logps=mu,
        step=0,
        source="boundary",
    )
    assert tr.replay_buffer.offer(group) == "admitted"

    merged = tr._mix_replay(dict(out), step=0)
    B = out["completion_ids"].size(0)
    assert merged["completion_ids"].shape == (B + G, C) and merged["prompt_ids"].shape == (B + G, 5)
    assert merged["replay_mask"].tolist() == [False] * B + [True] * G
    assert merged["prompt_mask"][B:, :2].sum() == 0  # left padding of the shorter prompt
    cur = tr._policy_logps(
        merged["prompt_ids"], merged["prompt_mask"], merged["completion_ids"], merged["completion_mask"]
    )
    m = merged["completion_mask"].bool()
    ref_fresh = tr._policy_logps(
        out["prompt_ids"], out["prompt_mask"], out["completion_ids"], out["completion_mask"]
    )
    torch.testing.assert_close(cur[:B, :7][m[:B, :7]], ref_fresh[m[:B, :7]], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cur[B:][m[B:]], mu[cmask.bool()], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(
        merged["old_per_token_logps"][B:][m[B:]], mu[cmask.bool()], rtol=1e-5, atol=1e-5
    )
    torch.testing.assert_close(merged["advantages"][B:], group_advantages(rewards, G), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(merged["behavior_per_token_logps"][B:], mu)
    assert merged["replay_num_items"].item() == cmask.sum().item()

    tr.current_gradient_accumulation_steps = 1
    loss = tr._compute_loss(tr.model, merged)
    loss.backward()
    assert torch.isfinite(loss) and tr._metrics["train"]["replay/is_weight_mean"][-1] == pytest.approx(
        1.0, abs=1e-4
    )

# The README section "Using rerule inside TRL / verl / OpenRLHF" runs in tests/test_readme.py.


def test_mix_replay_consistent_weights_sum_to_zero(model_dir, tmp_path):
    """An off-policy stored group (mu shifted per row): the merged rows carry advantages A_i and
    behavior log-probs whose weight exp(old - behavior) is the row weight G * p_i (the same on every
    token of a row), with sum_i G p_i A_i = 0, and the logged replay/adv_sum is 0."""
    tr = ReplayGRPOTrainer(
        model=model_dir,
        reward_funcs=random_reward,
        args=config(output_dir=str(tmp_path), replay_is_cap=2.0),
        processing_class=PreTrainedTokenizerFast.from_pretrained(model_dir),
        train_dataset=dataset(),
    )
    tr.model.train()
    out = make_inputs(tr, seed=8)
    g = torch.Generator().manual_seed(10)
    G, P, C = 4, 3, 6
    prompt = torch.randint(4, 65, (P,), generator=g)
    comp = torch.randint(4, 65, (G, C), generator=g)
    cmask = torch.ones(G, C, dtype=torch.long)
    pi = tr._policy_logps(prompt.expand(G, P), torch.ones(G, P, dtype=torch.long), comp, cmask)
    mu = pi + torch.tensor([0.3, -0.2, 0.4, -0.5])[:, None]  # sequence ratios e^-1.8 .. e^3 (one truncated)
    rewards = torch.tensor([1.0, 0.0, 0.5, 0.0])
    group = ReplayGroup(key=2, prompt_ids=prompt, completion_ids=comp, completion_mask=cmask, rewards=rewards,
                        advantages=torch.zeros(G), behavior_logps=mu, step=0, source="forget")
    assert tr.replay_buffer.offer(group) == "admitted"
    merged = tr._mix_replay(dict(out), step=0)
    B = out["completion_ids"].size(0)
    w = torch.exp(merged["old_per_token_logps"][B:, :C] - merged["behavior_per_token_logps"][B:, :C])
    torch.testing.assert_close(w, w[:, :1].expand_as(w), rtol=1e-4, atol=1e-5)
    adv = merged["advantages"][B:]
    assert abs(float((w[:, 0] * adv).sum())) < 1e-4 and float(w[:, 0].sum()) == pytest.approx(G, rel=1e-4)
    assert not torch.allclose(w[:, 0], torch.ones(G))
    assert tr._metrics["train"]["replay/adv_sum"][-1] == pytest.approx(0.0, abs=1e-9)
