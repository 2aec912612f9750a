"""Peak CPU memory of one TRL GRPO training micro-step: TRL's native loss vs FusedGRPOTrainer.

    python bench/bench_trl_memory.py                      # both paths, default shapes, one table
    python bench/bench_trl_memory.py --V 131072 --C 512   # other shapes
    python bench/bench_trl_memory.py --child native ...   # one path in this process (used internally)

Each path runs in its own process: a tiny Llama (H=128, 2 layers) with a large vocabulary V, B
sequences of P prompt + C completion tokens, loss_type dapo, on-policy (no old log-probs), fp32.
The step is what TRL's training_step runs: ``_compute_loss`` (backbone forward, lm head, loss)
and ``backward``. TRL 1.16's native path already avoids full logits (its fused lm head scores
[4096, 32768] tiles); ours (``rerule.fused_linear_grpo_loss``) scores row chunks of ~64 MB.

Reported: the process's high-water mark (VmHWM) during the step minus its resident size right
before it, after a warm-up step at a tiny size (library and allocator start-up are not counted).
Parameter gradients are part of the peak for both paths. Linux only (/proc/self/status; the mark
is reset by writing 5 to /proc/self/clear_refs).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def child(path: str, B: int, P: int, C: int, V: int, H: int, threads: int) -> dict:
    import torch
    from datasets import Dataset
    from tokenizers import Tokenizer, models
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    from trl import GRPOConfig, GRPOTrainer

    from rerule.integrations.trl import FusedGRPOTrainer

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    words = ["<pad>", "<eos>", "<unk>"] + [f"w{i}" for i in range(29)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
    cfg = LlamaConfig(
        vocab_size=V, hidden_size=H, intermediate_size=2 * H, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=P + C + 8, pad_token_id=0, eos_token_id=1,
        tie_word_embeddings=False,
    )
    args = GRPOConfig(
        output_dir="/tmp/rerule_bench_trl_memory", per_device_train_batch_size=4, num_generations=4,
        max_completion_length=C, bf16=False, use_cpu=True, report_to=[], save_strategy="no", use_vllm=False,
        loss_type="dapo", beta=0.0,
    )
    trainer = FusedGRPOTrainer(
        model=LlamaForCausalLM(cfg), reward_funcs=lambda completions, **k: [0.0] * len(completions), args=args,
        train_dataset=Dataset.from_dict({"prompt": ["w1 w2"] * 4}), processing_class=hf_tok,
    )
    trainer.current_gradient_accumulation_steps = 1
    model = trainer.model
    model.train()
    loss_fn = trainer._compute_loss if path == "rerule" else (lambda m, i: GRPOTrainer._compute_loss(trainer, m, i))

    def inputs(b, c):
        g = torch.Generator().manual_seed(1)
        mask = torch.ones(b, c, dtype=torch.long)
        return dict(
            prompt_ids=torch.randint(3, V, (b, P), generator=g), prompt_mask=torch.ones(b, P, dtype=torch.long),
            completion_ids=torch.randint(3, V, (b, c), generator=g), completion_mask=mask,
            advantages=torch.randn(b, generator=g), num_items_in_batch=mask.sum(),
        )

    def step(batch):
        loss = loss_fn(model, batch)
        loss.backward()
        model.zero_grad(set_to_none=True)
        return float(loss)

    step(inputs(1, 4))
    batch = inputs(B, C)
    gc.collect()
    _reset_peak()
    before = _status_kb("VmRSS")
    t0 = time.perf_counter()
    loss = step(batch)
    seconds = time.perf_counter() - t0
    peak = _status_kb("VmHWM")
    return {
        "path": path, "B": B, "P": P, "C": C, "tokens": B * C, "V": V, "H": H, "loss": loss,
        "peak_above_start_mb": round((peak - before) / 1024, 1), "seconds": round(seconds, 2),
        "torch": torch.__version__, "device": "cpu", "threads": threads,
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--child", choices=["native", "rerule"])
    ap.add_argument("--B", type=int, default=8)
    ap.add_argument("--P", type=int, default=16)
    ap.add_argument("--C", type=int, default=256)
    ap.add_argument("--V", type=int, nargs="+", default=[32000, 131072])
    ap.add_argument("--H", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", help="also write the JSON rows to this file")
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(a.child, a.B, a.P, a.C, a.V[0], a.H, a.threads)))
        return
    rows = []
    for V in a.V:
        for path in ("native", "rerule"):
            cmd = [sys.executable, __file__, "--child", path, "--B", str(a.B), "--P", str(a.P), "--C", str(a.C),
                   "--V", str(V), "--H", str(a.H), "--threads", str(a.threads)]
            res = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if res.returncode != 0:
                sys.exit(f"{path} V={V} failed:\n{res.stderr[-3000:]}")
            rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
    print(f"{'V':>8} {'tokens':>7} {'path':>7} {'peak MB':>9} {'seconds':>8} {'loss':>12}")
    for r in rows:
        print(f"{r['V']:>8} {r['tokens']:>7} {r['path']:>7} {r['peak_above_start_mb']:>9} {r['seconds']:>8} "
              f"{r['loss']:>12.6g}")
    if a.out:
        with open(a.out, "w") as f:
            f.write("\n".join(json.dumps(r) for r in rows) + "\n")


if __name__ == "__main__":
    main()
