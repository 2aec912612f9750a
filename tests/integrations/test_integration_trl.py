"""rerule.integrations.trl: parity of FusedGRPOTrainer._compute_loss with TRL's native _compute_loss
(loss, every parameter's gradient, logged metrics) on a tiny fp32 Llama, and short training runs of
FusedGRPOTrainer and ReplayGRPOTrainer.

The configs keep TRL's default use_bias_correction_kl=True (KL x the policy ratio) unless a test
turns it off; test_parity_with_trl runs both."""

from __future__ import annotations

import pytest
import torch
from transformers import PreTrainedTokenizerFast
from trl import GRPOTrainer

from rerule import fused_linear_grpo_loss, grpo_loss
from rerule.integrations.trl import FusedGRPOTrainer, ReplayGRPOTrainer
from rerule.kernels.grpo_math import importance_weights
from tests.integrations._trl_helpers import WORDS, config, dataset, make_inputs, random_reward


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
