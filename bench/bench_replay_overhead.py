"""Step-time overhead of ReRULE over RULE at equal steps (tiny Llama; CPU, and CUDA when present).

    pytest bench/bench_replay_overhead.py --benchmark-only -q      # named explicitly: not a test_* file

Two trainers with the same seed and config except ``replay.enabled`` run the same steps, interleaved
(a RULE step, then a ReRULE step, ...), so load from other processes hits both alike. On a shared
CPU the wall times are noisy; the headline ratio is the process CPU time per step (one torch
thread), which other processes do not inflate. The learning
rate is tiny, so both policies stay the same and sample the same rollouts: the only work that differs
is replay (one forward + backward over the replayed groups, plus their current log-probs and
recomputed advantages; nothing is regenerated). The goal is a ratio <= 1.05 (the paper reports
+5-11 % training time).

``extra_info`` records the median CPU and wall step times of both arms, their ratios, the update-only
wall ratio, and the generated / trained token counts.
"""

from __future__ import annotations

import statistics
import time
from types import SimpleNamespace as NS

import pytest
import torch

from rerule.train.config import TrainConfig
from rerule.train.trainer import Trainer

WARMUP_STEPS = 3
ROUNDS = 16
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _task(n: int = 16):
    recs = [NS(prompt=f"Tell me everything you know about item number {i}.", answer=f"item {i}",
               subject=f"Item {i}", source="forget" if i % 2 else "boundary") for i in range(n)]
    forget = [r for r in recs if r.source == "forget"]
    return NS(forget=forget, boundary=[r for r in recs if r.source != "forget"])


def _reward(texts, records):
    # ~26 % of a random character model's first characters are uppercase: most groups are hard and
    # not flat, so the buffer is full of replayable groups from the first step.
    return [1.0 if t[:1].isupper() else 0.0 for t in texts]


def _trainer(device: str, replay: bool, tmp_path) -> Trainer:
    cfg = TrainConfig.from_dict({
        "steps": 10**6, "seed": 0, "device": device, "output_dir": str(tmp_path / f"replay={replay}"),
        "progress": False, "save_final": False, "tensorboard": "off",
        "rollout": {"group_size": 8, "prompts_per_step": 8, "max_new_tokens": 32},
        "optim": {"lr": 1e-7}, "loss": {"beta": 0.0},
        "replay": {"enabled": replay, "start_step": 1, "fraction": 0.125, "staleness": 16},
    })
    return Trainer(cfg, task=_task(), reward_fn=_reward)


@pytest.mark.parametrize("device", DEVICES)
def test_replay_overhead(benchmark, device, tmp_path):
    rule, rerule = _trainer(device, False, tmp_path), _trainer(device, True, tmp_path)
    for _ in range(WARMUP_STEPS):
        rule.train_step()
        rerule.train_step()
    cpu = {"rule": [], "rerule": []}

    def step(name, trainer):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.process_time()
        trainer.train_step()
        if device == "cuda":
            torch.cuda.synchronize()
        cpu[name].append(time.process_time() - t0)

    # The RULE step is each round's setup, which pytest-benchmark does not time; both time themselves.
    rounds = ROUNDS if benchmark.enabled else 1  # --benchmark-disable: one paired round, as a plain test
    benchmark.pedantic(step, args=("rerule", rerule), setup=lambda: step("rule", rule), rounds=rounds,
                       iterations=1, warmup_rounds=0)
    rule_steps, rerule_steps = rule.history[-rounds:], rerule.history[-rounds:]
    assert all(m["replay_groups"] >= 1 for m in rerule_steps), "the benchmark must actually replay"

    def med(rows, key):
        return statistics.median(m[key] for m in rows)

    c_rule, c_rerule = statistics.median(cpu["rule"]), statistics.median(cpu["rerule"])
    # Rounds are paired (same step, same rollouts): the median of the per-round ratios is the headline.
    paired = statistics.median(b / a for a, b in zip(cpu["rule"], cpu["rerule"]))
    t_rule, t_rerule = med(rule_steps, "time_step_s"), med(rerule_steps, "time_step_s")
    u_rule, u_rerule = med(rule_steps, "time_update_s"), med(rerule_steps, "time_update_s")
    benchmark.extra_info.update({
        "device": device, "threads": torch.get_num_threads(), "rounds": rounds,
        "rule_step_cpu_s": c_rule, "rerule_step_cpu_s": c_rerule, "step_cpu_ratio": paired,
        "rule_step_s": t_rule, "rerule_step_s": t_rerule, "step_time_ratio": t_rerule / t_rule,
        "rule_rollout_s": med(rule_steps, "time_rollout_s"),
        "rerule_rollout_s": med(rerule_steps, "time_rollout_s"),
        "rule_update_s": u_rule, "rerule_update_s": u_rerule, "update_time_ratio": u_rerule / u_rule,
        "generated_tokens_rule": sum(m["generated_tokens"] for m in rule_steps),
        "generated_tokens_rerule": sum(m["generated_tokens"] for m in rerule_steps),
        "train_tokens_rule": sum(m["train_tokens"] for m in rule_steps),
        "train_tokens_rerule": sum(m["train_tokens"] for m in rerule_steps),
        "replay_groups_per_step": statistics.mean(m["replay_groups"] for m in rerule_steps),
    })
    print(f"\n[{device}] CPU time per step: RULE {c_rule * 1e3:.0f} ms, ReRULE {c_rerule * 1e3:.0f} ms, "
          f"paired ratio {paired:.3f}; wall ratio {t_rerule / t_rule:.3f} (update only "
          f"{u_rerule / u_rule:.3f})")
