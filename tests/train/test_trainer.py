"""Trainer on a toy task with a tiny Llama (CPU, seconds): RULE learns, parameters move, replay
happens with w <= cap and a real gradient, micro-batching is exact, RULE and ReRULE share one path."""

from __future__ import annotations

import json
import math

import pytest
import torch

from rerule import cli
from rerule.loss import group_advantages
from rerule.train.config import TrainConfig
from rerule.train.model import build_char_tokenizer, build_tiny_llama
from rerule.train.rollout import (
    SeqBatch,
    behavior_logps,
    completion_mask_from_eos,
    encode_prompts,
    generate,
    left_pad,
)
from rerule.train.trainer import Trainer
from rerule.train.update import PolicyUpdate, UpdateSet, recompute_advantages
from rerule.train.warm_start import warm_start_examples
from tests.train._toy import toy_task, upper_reward

UPPER = [c for c in "ABCDEFGHIJKLMNOPQRSTUVWXYZ"]


def toy_config(tmp_path, **over):
    base = {
        "steps": 10, "seed": 0, "output_dir": str(tmp_path / "run"), "progress": False, "save_final": False,
        "tensorboard": "off",
        "rollout": {"group_size": 8, "prompts_per_step": 4, "max_new_tokens": 4},
        "optim": {"lr": 2e-2}, "loss": {"beta": 0.0},
        "replay": {"enabled": False},
    }
    cfg = TrainConfig.from_dict(base)
    return cfg.apply_overrides(over) if over else cfg


def p_upper(trainer):
    """Exact P(first completion char is uppercase), averaged over the prompts."""
    tok = trainer.tokenizer
    ids, mask = left_pad(trainer.prompt_ids, tok.pad_token_id)
    with torch.no_grad():
        logits = trainer.model(
            input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)
        ).logits
    probs = torch.softmax(logits[:, -1].float(), -1)
    return float(probs[:, tok.convert_tokens_to_ids(UPPER)].sum(-1).mean())


def test_rule_steps_improve_reward_and_change_parameters(tmp_path):
    tr = Trainer(toy_config(tmp_path, steps=12), task=toy_task(), reward_fn=upper_reward)
    before = [p.detach().clone() for p in tr.model.parameters()]
    p0 = p_upper(tr)
    hist = tr.train()
    p1 = p_upper(tr)
    assert p1 > p0 + 0.3, (p0, p1)
    first, last = sum(m["reward"] for m in hist[:3]) / 3, sum(m["reward"] for m in hist[-3:]) / 3
    assert last > first + 0.2, [m["reward"] for m in hist]
    changed = [not torch.equal(a, b) for a, b in zip(before, tr.model.parameters())]
    assert all(changed)
    assert all(m["stage"] == "on_policy" and m["buffer_size"] == 0 and m["replay_groups"] == 0 for m in hist)
    for key in (
        "step",
        "stage",
        "reward",
        "forget_reward",
        "boundary_reward",
        "forget_refusal_rate",
        "buffer_size",
        "replay_groups",
        "is_weight_mean",
        "is_ess",
        "time_step_s",
        "generated_tokens",
        "train_tokens",
    ):
        assert key in hist[-1], key
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 13))


def test_replay_updates_happen_with_capped_weights(tmp_path):
    cfg = toy_config(
        tmp_path,
        steps=6,
        **{"replay.enabled": "true", "replay.start_step": 2, "replay.fraction": 0.5, "replay.cap": 1.5,
           "replay.advantages": "recomputed"},
    )
    tr = Trainer(cfg, task=toy_task(), reward_fn=upper_reward)
    hist = tr.train()
    assert [m["stage"] for m in hist] == ["on_policy"] * 2 + ["hybrid"] * 4
    assert all(m["replay_groups"] == 0 for m in hist[:2])
    hybrid = hist[2:]
    assert all(m["replay_groups"] == 2 for m in hybrid), [m["replay_groups"] for m in hist]
    assert all(0 < m["is_weight_max"] <= 1.5 for m in hybrid)
    assert all(0 < m["is_ess"] <= 1 and m["loss_replay"] is not None for m in hybrid)
    assert all(m["train_tokens"] > m["generated_tokens"] for m in hybrid)
    assert hist[1]["buffer_size"] > 0


def test_stored_behavior_logps_are_the_sampling_policy(tmp_path):
    cfg = toy_config(tmp_path, steps=1, **{"replay.enabled": "true"})
    tr = Trainer(cfg, task=toy_task(), reward_fn=upper_reward)
    sampler = build_tiny_llama(len(tr.tokenizer), seed=0, tokenizer=tr.tokenizer)
    sampler.load_state_dict(tr.model.state_dict())
    tr.train_step()
    assert len(tr.buffer) > 0
    for g in tr.buffer.entries:
        p_ids, p_mask = left_pad([g.prompt_ids] * g.group_size, tr.tokenizer.pad_token_id)
        mu = behavior_logps(sampler, SeqBatch(p_ids, p_mask, g.completion_ids, g.completion_mask))
        torch.testing.assert_close(g.behavior_logps, mu, atol=1e-5, rtol=1e-5)
        assert not torch.equal(
            g.behavior_logps,
            behavior_logps(tr.model, SeqBatch(p_ids, p_mask, g.completion_ids, g.completion_mask)),
        )


def test_behavior_logps_match_generate_positions():
    tok = build_char_tokenizer()
    model = build_tiny_llama(len(tok), seed=1, tokenizer=tok)
    prompts = encode_prompts(
        tok, ["Question: who?\nAnswer:", "Q: a much longer prompt here?\nA:"], 64, chat=False
    )
    ids, mask = left_pad([p for p in prompts for _ in range(3)], tok.pad_token_id)
    out = model.generate(
        input_ids=ids,
        attention_mask=mask,
        do_sample=True,
        top_k=0,
        max_new_tokens=6,
        output_logits=True,
        return_dict_in_generate=True,
        pad_token_id=0,
        eos_token_id=2,
    )
    comp = out.sequences[:, ids.shape[1] :]
    raw = torch.log_softmax(torch.stack(out.logits, 1).float(), -1).gather(-1, comp.unsqueeze(-1)).squeeze(-1)
    cmask = completion_mask_from_eos(comp, [2])
    mu = behavior_logps(model, SeqBatch(ids, mask, comp, cmask))
    torch.testing.assert_close(mu * cmask, raw * cmask, atol=1e-5, rtol=1e-5)
    # A checkpoint's own generation settings must not leak into RL sampling: transformers fills every
    # option generate() was not given from them (here: every token but <pad> <s> </s> suppressed).
    model.generation_config.suppress_tokens = list(range(3, len(tok)))
    batch, texts = generate(model, tok, prompts, 4, max_new_tokens=6)
    assert batch.completion_ids.shape[0] == 8 and len(texts) == 8
    assert len(set(texts[:4])) > 1 and len(set(texts[4:])) > 1, texts
    assert model.generation_config.suppress_tokens == list(range(3, len(tok)))


def test_recompute_advantages():
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.5])
    mask = torch.ones(8, 3)
    mu = -torch.rand(8, 3)
    # equal weights (the policy has not moved): exactly GRPO's group advantages
    torch.testing.assert_close(recompute_advantages(rewards, mu, mu, mask, 4), group_advantages(rewards, 4))
    # the current policy now strongly prefers completion 0 (reward 1): its baseline rises toward 1
    cur = mu.clone()
    cur[0] += 2.0
    adv = recompute_advantages(rewards, cur, mu, mask, 4)
    stored = group_advantages(rewards, 4)
    assert adv[0] < stored[0] and adv[1] < stored[1]
    # weights piled on the equal-reward completions 1-3: the weighted std is ~0, and the std floor
    # (the equal-weight std, 0.5) keeps the rare completion's advantage at (1 - 0) / 0.5, not ~1e13
    cur = mu.clone()
    cur[1:4] += 10.0
    adv = recompute_advantages(rewards, cur, mu, mask, 4)
    assert adv[0] == pytest.approx(2.0, abs=1e-3) and adv[1:4].abs().max() < 1e-6


def _random_set(V, B=8, T=5, P=3, G=4, seed=0, behavior=False):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, V, (B, T), generator=g)
    cmask = torch.ones(B, T, dtype=torch.long)
    cmask[1, 3:] = 0
    cmask[6, 1:] = 0
    p_ids = torch.randint(3, V, (B, P), generator=g)
    p_mask = torch.ones(B, P, dtype=torch.long)
    p_mask[2, :1] = 0
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0])[:B]
    beh = (-torch.rand(B, T, generator=g) * 3) if behavior else None
    return UpdateSet(SeqBatch(p_ids, p_mask, ids, cmask), group_advantages(rewards, G), rewards, beh, None, G)


LOSS_KW = dict(temperature=1.0, epsilon_low=0.2, epsilon_high=0.3, dual_clip=3.0, beta=0.0,
               importance_sampling_level="token")


def _grads(model, update, fresh, replayed):
    model.zero_grad(set_to_none=True)
    update(fresh, replayed)
    return [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("micro", [4, 12], ids=["micro4", "micro12-straddles"])
@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
def test_micro_batches_match_full_batch(loss_type, micro):
    tok = build_char_tokenizer()
    model = build_tiny_llama(len(tok), seed=2, tokenizer=tok)
    kw = dict(
        LOSS_KW, loss_type=loss_type, **({"max_completion_length": 8} if loss_type == "dr_grpo" else {})
    )
    fresh, rep = _random_set(len(tok)), _random_set(len(tok), T=7, P=5, seed=1, behavior=True)
    full = _grads(model, PolicyUpdate(model, kw, "logits", "torch", None, None, 2.0, 0.7), fresh, rep)
    split = _grads(model, PolicyUpdate(model, kw, "logits", "torch", None, micro, 2.0, 0.7), fresh, rep)
    for a, b in zip(full, split):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("beta", [0.0, 0.05], ids=["no-kl", "kl"])
@pytest.mark.parametrize("mode", ["consistent", "recomputed"])
@pytest.mark.parametrize("normalize", ["replay", "batch"])
def test_replayed_loss_gradient_is_the_decoupled_objective(normalize, mode, beta):
    """Replay-only gradient (fresh advantages zero) equals an independent autograd of
    lambda * sum_seq(mean_t(-rw_i * w_t * A_i * exp(logp - logp.detach()) + beta * kw_t * k3_t)) / n with
    n = replayed rows ("replay": L_replay is its own mean) or fresh + replayed rows ("batch") and
    - consistent: p_i = softmax_i(min(sum_t (logp - mu), log cap)), b = sum p r, s^2 = G/(G-1) sum p (r - b)^2,
      A_i = (r_i - b) / (s + 1e-4), rw_i = G p_i, w_t = 1, KL weight kw_t = G p_i;
    - recomputed (the biased ablation): A from recompute_advantages, rw_i = 1,
      w_t = kw_t = min(exp(logp - mu), cap)."""
    tok = build_char_tokenizer()
    model = build_tiny_llama(len(tok), seed=3, tokenizer=tok)
    fresh = _random_set(len(tok))
    fresh.advantages = torch.zeros_like(fresh.advantages)
    rep = _random_set(len(tok), T=6, P=4, seed=4, behavior=True)
    G = rep.group_size
    lam, cap = 0.7, 1.5
    kw = dict(LOSS_KW, loss_type="grpo", beta=beta, is_weight_kl=True)
    if beta:
        rep.ref = -torch.rand(rep.batch.completion_ids.shape, generator=torch.Generator().manual_seed(5)) * 4
    update = PolicyUpdate(model, kw, "logits", "torch", None, None, cap, lam, advantages=mode,
                          replay_normalize=normalize)
    if beta:
        # the fresh rows' KL gradient is exactly zero: their reference is their own current log-probs
        with torch.no_grad():
            fresh.ref = update._current_logps(update._features(fresh.batch), fresh.batch)
    got = _grads(model, update, fresh, rep)
    assert sum(float(g.abs().sum()) for g in got) > 0

    model.zero_grad(set_to_none=True)
    b = rep.batch
    inp = torch.cat([b.prompt_ids, b.completion_ids], 1)
    att = torch.cat([b.prompt_mask, b.completion_mask], 1)
    logits = model(input_ids=inp, attention_mask=att, position_ids=(att.cumsum(-1) - 1).clamp(min=0)).logits
    logits = logits[:, b.prompt_ids.shape[1] - 1 : -1].double()
    logp = torch.log_softmax(logits, -1).gather(-1, b.completion_ids.unsqueeze(-1)).squeeze(-1)
    m = b.completion_mask.double()
    mu = rep.behavior.double()
    if mode == "consistent":
        r = rep.rewards.double().view(-1, G)
        lr = ((logp.detach() - mu) * m).sum(-1).view(-1, G)
        p = torch.softmax(lr.clamp(max=math.log(cap)), -1)
        base = (p * r).sum(-1, keepdim=True)
        s = (G / (G - 1) * (p * (r - base) ** 2).sum(-1, keepdim=True)).sqrt()
        adv = ((r - base) / (s + 1e-4)).view(-1)
        w = (G * p).view(-1, 1).expand_as(logp)
        assert float((w[:, 0] * adv).view(-1, G).sum(-1).abs().max()) < 1e-9
    else:
        adv = recompute_advantages(rep.rewards, logp.detach().float(), rep.behavior, b.completion_mask, G).double()
        w = torch.exp(logp.detach() - mu).clamp(max=cap)
    tok_loss = -w * adv[:, None] * torch.exp(logp - logp.detach())
    if beta:
        ref = rep.ref.double()
        tok_loss = tok_loss + beta * w * (torch.exp(ref - logp) - (ref - logp) - 1)
    n = len(rep.batch) + (len(fresh.batch) if normalize == "batch" else 0)
    (lam * ((tok_loss * m).sum(-1) / m.sum(-1)).sum() / n).backward()
    for a, p_ in zip(got, model.parameters()):
        torch.testing.assert_close(a, p_.grad.to(a.dtype), atol=1e-6, rtol=1e-4)


def test_replay_disabled_is_rule_on_the_same_path(tmp_path):
    """ReRULE before its first replay is RULE exactly: same rewards, losses and final weights."""
    rule = Trainer(toy_config(tmp_path / "a", steps=4), task=toy_task(), reward_fn=upper_reward)
    rerule = Trainer(
        toy_config(tmp_path / "b", steps=4, **{"replay.enabled": "true", "replay.start_step": 100}),
        task=toy_task(),
        reward_fn=upper_reward,
    )
    h1, h2 = rule.train(), rerule.train()
    for key in ("reward", "loss_on", "grad_norm", "generated_tokens"):
        assert [m[key] for m in h1] == [m[key] for m in h2], key
    assert h2[-1]["buffer_size"] > 0 and h1[-1]["buffer_size"] == 0
    for a, b in zip(rule.model.parameters(), rerule.model.parameters()):
        assert torch.equal(a, b)


def test_warm_start_kl_reference_and_hooks(tmp_path):
    cfg = toy_config(
        tmp_path,
        steps=3,
        eval_every=2,
        **{"loss.beta": 0.05, "warm_start.epochs": 4, "warm_start.lr": 1e-2, "warm_start.warmup_steps": 0},
    )
    examples = warm_start_examples(toy_task(), 0.5, seed=0)
    assert sum("not certain" in t or "beyond" in t for _, t in examples) == 2 and len(examples) == 6
    # RULE's rejection steering: the same refusals, no boundary answers
    steering = warm_start_examples(toy_task(), 0.5, seed=0, mode="rejection_steering")
    assert steering == examples[:2] and all(r.source == "forget" for r, _ in steering)
    with pytest.raises(ValueError, match="mode"):
        warm_start_examples(toy_task(), 0.5, seed=0, mode="answers")
    seen = []
    tr = Trainer(cfg, task=toy_task(), reward_fn=upper_reward, evaluate_fn=lambda t: {"p_upper": p_upper(t)})
    # the warm start is a stage of train(): the trainer is built without it, and its KL reference after it
    assert tr.warm_start_stats == {} and tr.reference is None and not (tmp_path / "run" / "reference.pt").exists()
    hist = tr.train(callback=lambda m: seen.append(m["step"]) or m["step"] == 2)
    ws = tr.warm_start_stats
    assert ws["warm_start_steps"] == 3 and ws["warm_start_loss_last"] < ws["warm_start_loss_first"]
    assert tr.reference is not None and (tmp_path / "run" / "reference.pt").is_file()
    stored = torch.load(tmp_path / "run" / "reference.pt", weights_only=True)  # the warm-started weights
    assert all(torch.equal(v.float(), stored[k].float()) for k, v in tr.reference.state_dict().items())
    assert json.loads((tmp_path / "run" / "run_info.json").read_text())["warm_start"] == json.loads(json.dumps(ws))
    assert seen == [1, 2] and len(hist) == 2  # the callback stopped it
    assert "eval/p_upper" in hist[1] and "eval/p_upper" not in hist[0]
    assert hist[-1]["kl"] > 0


def test_lora_trains_only_the_adapter(tmp_path):
    cfg = toy_config(
        tmp_path,
        steps=2,
        **{
            "model.lora.enabled": "true",
            "model.lora.r": 4,
            "loss.beta": 0.05,
            "replay.enabled": "true",
            "replay.start_step": 1,
        },
    )
    tr = Trainer(cfg, task=toy_task(), reward_fn=upper_reward)
    assert tr.lora and tr.reference is None
    frozen = {n: p.detach().clone() for n, p in tr.model.named_parameters() if not p.requires_grad}
    trained = {n: p.detach().clone() for n, p in tr.model.named_parameters() if p.requires_grad}
    assert trained and all("lora_" in n for n in trained)
    hist = tr.train()
    assert hist[-1]["kl"] >= 0
    named = dict(tr.model.named_parameters())
    assert all(torch.equal(v, named[n]) for n, v in frozen.items())
    assert any(not torch.equal(v, named[n]) for n, v in trained.items())


def test_cli_train_and_resume(tmp_path, capsys):
    yaml_path = tmp_path / "c.yaml"
    yaml_path.write_text(
        "steps: 2\ndevice: cpu\nprogress: false\ntensorboard: 'off'\nsave_final: false\n"
        f"output_dir: {tmp_path / 'cli'}\n"
        "task: {name: synthetic, kwargs: {n_forget: 2, n_boundary: 2, n_retain: 0, n_attributes: 1,"
        " n_templates: 1}}\n"
        "rollout: {group_size: 2, prompts_per_step: 2, max_new_tokens: 3}\noptim: {lr: 1.0e-3}\n"
    )
    assert cli.main(["train", "--config", str(yaml_path), "--replay.cap=1.5"]) == 0
    assert cli.main(["train", "--config", str(yaml_path), "--steps", "3", "--resume"]) == 0
    rows = (tmp_path / "cli" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(r)["step"] for r in rows] == [1, 2, 3]
    assert cli.main(["train", "--config", str(yaml_path), "--rollout.group_size", "1"]) == 2
    assert "group_size" in capsys.readouterr().err
    assert cli.parse_overrides(["--a.b", "1", "--c=x", "--flag"]) == {"a.b": "1", "c": "x", "flag": "true"}


def test_fused_linear_path_matches_logits_path():
    """loss_impl=fused_linear (hidden states + lm_head weight) gives the logits path's gradients and
    pre-update log-probs, fresh and replayed groups alike."""
    tok = build_char_tokenizer()
    model = build_tiny_llama(len(tok), seed=5, tokenizer=tok)
    kw = dict(LOSS_KW, loss_type="grpo")
    fresh, rep = _random_set(len(tok), seed=6), _random_set(len(tok), T=3, P=6, seed=7, behavior=True)
    results = []
    for impl in ("logits", "fused_linear"):
        model.zero_grad(set_to_none=True)
        logps, stats = PolicyUpdate(model, kw, impl, "torch", None, 4, 1.5, 0.5)(fresh, rep)
        results.append((logps, stats, [p.grad.clone() for p in model.parameters()]))
    (l1, s1, g1), (l2, s2, g2) = results
    torch.testing.assert_close(l1, l2, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(s1["replay_advantages"], s2["replay_advantages"], atol=1e-5, rtol=1e-5)
    assert abs(s1["is_weight_mean"] - s2["is_weight_mean"]) < 1e-5
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_stored_advantages_mode_and_lambda_scaling():
    tok = build_char_tokenizer()
    model = build_tiny_llama(len(tok), seed=8, tokenizer=tok)
    fresh = _random_set(len(tok))
    fresh.advantages = torch.zeros_like(fresh.advantages)
    rep = _random_set(len(tok), T=4, P=2, seed=9, behavior=True)
    kw = dict(LOSS_KW, loss_type="grpo")
    update = PolicyUpdate(model, kw, "logits", "torch", None, None, 2.0, 1.0, advantages="stored")
    model.zero_grad(set_to_none=True)
    _, stats = update(fresh, rep)
    assert torch.equal(stats["replay_advantages"], rep.advantages)
    g1 = [p.grad.clone() for p in model.parameters()]
    half_lambda = PolicyUpdate(model, kw, "logits", "torch", None, None, 2.0, 0.5, "stored")
    half = _grads(model, half_lambda, fresh, rep)
    for a, b in zip(g1, half):
        torch.testing.assert_close(b, 0.5 * a, atol=1e-7, rtol=1e-5)


def test_tokenizers_round_trip_and_bpe_is_deterministic():
    from rerule.train.model import build_bpe_tokenizer

    text = "Question: Where was Mira Tolvane born?\nAnswer: Velmora."
    char = build_char_tokenizer()
    assert char.decode(char(text, add_special_tokens=False)["input_ids"]) == text
    assert char(text)["input_ids"][0] == char.bos_token_id
    corpus = "\n".join([text, "Question: What does Mira Tolvane do?\nAnswer: a novelist."] * 20)
    a, b = build_bpe_tokenizer(corpus, 300), build_bpe_tokenizer(corpus, 300)
    assert a.get_vocab() == b.get_vocab() and len(a) <= 300
    ids = a(text, add_special_tokens=False)["input_ids"]
    assert a.decode(ids) == text and len(ids) < len(text) / 2


def test_consistent_replay_run_logs_zero_advantage_sums(tmp_path):
    """The default estimator in the loop: replayed groups' weighted advantages sum to 0 per source,
    row weights <= G, sequence-level ESS in [1, G], per-source counts add up, collapse metrics present."""
    cfg = toy_config(tmp_path, steps=5, **{"replay.enabled": "true", "replay.start_step": 1, "replay.fraction": 0.5})
    assert cfg.replay.advantages == "consistent"
    hist = Trainer(cfg, task=toy_task(), reward_fn=upper_reward).train()
    hybrid = [m for m in hist if m["replay_groups"]]
    assert hybrid, [m["buffer_size"] for m in hist]
    for m in hybrid:
        assert m["replay_forget_groups"] + m["replay_boundary_groups"] == m["replay_groups"]
        sums = [m[k] for k in ("replay_adv_sum_forget", "replay_adv_sum_boundary") if m[k] is not None]
        assert sums and max(abs(x) for x in sums) < 1e-4
        assert 1.0 <= m["replay_ess"] <= 8.0 + 1e-9 and 0 < m["is_weight_max"] <= 8.0
        # one update per rollout batch: the ratio against the current policy is 1, nothing is clipped
        assert m["replay_clip_ratio_low"] == 0.0 and m["replay_clip_ratio_high"] == 0.0
    assert all(m["replay_clip_ratio_low"] is None for m in hist if not m["replay_groups"])
    assert all(m["boundary_collapsed_prompts"] >= 0 and m["boundary_all_refuse_groups"] >= 0 for m in hist)


def test_replay_sources_filter_the_buffer(tmp_path):
    cfg = toy_config(tmp_path, steps=4, **{"replay.enabled": "true", "replay.start_step": 1,
                                           "replay.fraction": 0.5, "replay.sources": "forget"})
    tr = Trainer(cfg, task=toy_task(), reward_fn=upper_reward)
    hist = tr.train()
    assert all(e.source == "forget" for e in tr.buffer.entries)
    assert tr.buffer.counters["source_excluded"] > 0
    assert sum(m["replay_groups"] for m in hist) > 0 and all(m["replay_boundary_groups"] == 0 for m in hist)
    with pytest.raises(ValueError, match="replay.sources"):
        toy_config(tmp_path, **{"replay.sources": "retain"})
    with pytest.raises(ValueError, match="replay.forget_share"):
        toy_config(tmp_path, **{"replay.forget_share": 1.5})
