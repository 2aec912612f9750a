"""Peak CPU memory (RSS) of one fwd+bwd of the GRPO loss from hidden states, one path per process.

    python bench/memory_fused_linear.py {eager,fused,liger} [--B 4 --T 1024 --H 512 --V 32000]

Prints one JSON line: {"mode", "peak_above_inputs_mb", "seconds", "loss", ...}. The number is the
process's high-water mark (VmHWM) during fwd+bwd minus its resident size (VmRSS) right before,
after the inputs are allocated and the path has been warmed up at a tiny size (so library and
allocator start-up costs are not counted). The gradients (hidden, weight) are part of the peak:
they are outputs every path must produce. Linux only (reads /proc/self/status; resets the mark by
writing 5 to /proc/self/clear_refs, and falls back to ru_maxrss when that is not allowed).

Paths: eager = ``hidden @ weight.T`` then the autograd reference loss (``grpo_loss_reference``, what
a plain torch trainer does); fused = ``rerule.fused_linear_grpo_loss(impl="torch")``;
liger = ``liger_kernel.chunked_loss.LigerFusedLinearGRPOLoss(compiled=False)``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import time

import torch


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def make_inputs(B, T, H, V, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(B, T, H, generator=g) / H**0.5).requires_grad_()
    weight = torch.randn(V, H, generator=g).requires_grad_()
    ids = torch.randint(0, V, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.int64)
    adv = torch.randn(B, generator=g)
    return hidden, weight, ids, mask, adv


def run_path(mode, hidden, weight, ids, mask, adv, loss_type="grpo"):
    """One fwd+bwd; leaves the gradients in hidden.grad / weight.grad. Returns the loss."""
    if mode == "eager":
        from rerule.kernels.options import LossOptions
        from rerule.kernels.reference import grpo_loss_reference

        logits = hidden @ weight.T
        loss = grpo_loss_reference(logits, ids, mask, adv, options=LossOptions(loss_type=loss_type))[0]
    elif mode == "fused":
        from rerule import fused_linear_grpo_loss

        loss = fused_linear_grpo_loss(hidden, weight, ids, mask, adv, loss_type=loss_type, impl="torch").loss
    elif mode == "liger":
        from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

        fn = LigerFusedLinearGRPOLoss(beta=0.0, compiled=False, use_ref_model=False, loss_type=loss_type)
        loss = fn(hidden, weight, ids, mask, adv)[0]
    else:
        raise ValueError(f"unknown mode {mode!r}")
    loss.backward()
    return float(loss)


def measure(mode, B=4, T=1024, H=512, V=32000, threads=1):
    torch.set_num_threads(threads)
    # warm-up at a tiny size: imports, kernels and allocator pools are not part of the loss's peak
    run_path(mode, *make_inputs(2, 4, 8, 64, seed=1))
    inputs = make_inputs(B, T, H, V)
    gc.collect()
    cleared = _reset_peak()
    base_kb = _status_kb("VmRSS")
    max_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    loss = run_path(mode, *inputs)
    seconds = time.perf_counter() - t0
    peak_kb = _status_kb("VmHWM") if cleared else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if not cleared and peak_kb <= max_before:
        raise RuntimeError("cannot reset the RSS high-water mark and the run did not exceed the earlier peak")
    return {
        "mode": mode, "B": B, "T": T, "H": H, "V": V, "threads": threads,
        "peak_above_inputs_mb": (peak_kb - base_kb) / 1024, "inputs_rss_mb": base_kb / 1024,
        "seconds": seconds, "loss": loss, "hwm_reset": cleared, "pid": os.getpid(),
    }


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("mode", choices=("eager", "fused", "liger"))
    p.add_argument("--B", type=int, default=4)
    p.add_argument("--T", type=int, default=1024)
    p.add_argument("--H", type=int, default=512)
    p.add_argument("--V", type=int, default=32000)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    print(json.dumps(measure(a.mode, a.B, a.T, a.H, a.V, a.threads)))


if __name__ == "__main__":
    main()
