"""Turn a benchmark results JSON (bench/results/<card>-<date>.json) into the README table and a chart.

    python bench/report.py RESULTS.json [--md OUT.md] [--png OUT.png] [--update DOC.md] [--goals]

``--update`` rewrites the part of DOC.md between ``<!-- bench-table:start -->`` and
``<!-- bench-table:end -->``. ``--goals`` prints issue 4's performance goals against the results
(they are stated for a GPU; on a CPU file they are printed as not applicable).

Speedups and memory ratios are given only between rows whose impls passed the correctness gate
(a failing impl has no timing row at all), and only within one results file: one card, one run.
Depends on json and matplotlib only, so it runs anywhere.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import OrderedDict
from pathlib import Path

START, END = "<!-- bench-table:start -->", "<!-- bench-table:end -->"
OP_TITLES = OrderedDict(
    [
        ("loss", "GRPO loss over logits (`rerule.grpo_loss`)"),
        ("linear", "Fused-linear GRPO loss (`rerule.fused_linear_grpo_loss`)"),
        ("logps", "Per-token log-probs (`rerule.token_logps`)"),
        ("advantages", "Group advantages (`rerule.group_advantages`)"),
    ]
)
MODE_ORDER = {"fwd": 0, "fwd+bwd": 1}


def load(path) -> dict:
    data = json.loads(Path(path).read_text())
    if "rows" not in data or "card" not in data:
        raise ValueError(f"{path} is not a rerule benchmark results file (no 'rows'/'card')")
    return data


def shape_id(shape: dict) -> str:
    parts = [f"N={shape['N']}"]
    if shape.get("V"):
        parts.append(f"V={shape['V']}")
    if shape.get("H"):
        parts.append(f"H={shape['H']}")
    return " ".join(parts)


def groups(rows):
    """{(op, shape id, mode): [rows sorted by median]} in op, shape, mode order."""
    out: dict = {}
    for r in rows:
        out.setdefault((r["op"], shape_id(r["shape"]), r["mode"]), []).append(r)
    ops = list(OP_TITLES)
    key = lambda k: (ops.index(k[0]) if k[0] in ops else 99, k[1], MODE_ORDER.get(k[2], 9))
    return OrderedDict((k, sorted(out[k], key=lambda r: r["median_ms"])) for k in sorted(out, key=key))


def best_ours(rows):
    ours = [r for r in rows if r.get("ours") and r.get("gate_passed", True)]
    return min(ours, key=lambda r: r["median_ms"]) if ours else None


def _fmt(x, digits=3):
    if x is None:
        return "–"
    if abs(x) >= 100:
        return f"{x:,.0f}"
    return f"{x:.{digits}g}"


def _rate(r):
    if r.get("TFLOPs") is not None:
        return f"{_fmt(r['TFLOPs'])} TFLOP/s"
    if r.get("GBps") is not None:
        return f"{_fmt(r['GBps'])} GB/s"
    return "–"


def markdown(data: dict) -> str:
    roof = data.get("roofline") or {}
    v = data.get("versions") or {}
    lines = [
        f"**{data['card']}** ({data['device']}"
        + (f", {data['threads']} thread{'s' if data['threads'] != 1 else ''}" if data.get("threads") else "")
        + f"), {data['date']}, {data['dtype']}, profile `{data['profile']}`.",
        "",
        f"Roofline measured at the start of the run: copy {_fmt(roof.get('copy_GBps'))} GB/s (read + write), "
        f"GEMM {_fmt(roof.get('gemm_TFLOPs'))} TFLOP/s ({roof.get('gemm_dtype', '?')}, "
        f"{roof.get('gemm_n', '?')}³). "
        + "Versions: "
        + ", ".join(
            f"{k} {v[k]}" for k in ("torch", "triton", "rerule", "liger_kernel", "trl", "git") if v.get(k)
        )
        + ".",
        "",
        "Median of the rounds, every call synchronized. Rate and roofline use the op's floor (loss: "
        "2·N·V·bytes fwd+bwd; log-probs: 3·N·V·bytes fwd+bwd; fused-linear: 8·N·H·V FLOPs fwd+bwd; fwd: "
        "one read / 2·N·H·V). *× ours* = this row's time (memory) over our fastest impl's at the same "
        "shape and mode. Peak memory is above what was allocated before the call "
        f"({'torch.cuda.max_memory_allocated' if data['device'] == 'cuda' else 'peak RSS'}). "
        "*gate err*: the largest relative error of the impl's outputs and gradients against the "
        "high-precision spec in the correctness gate.",
    ]
    for op, title in OP_TITLES.items():
        keyed = [(k, rs) for k, rs in groups(data["rows"]).items() if k[0] == op]
        if not keyed:
            continue
        lines += [
            "",
            f"#### {title}",
            "",
            "| shape | mode | impl | median ms | rate | roofline | peak MB | × ours time | × ours mem "
            "| gate err |",
            "|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for (_, shape, mode), rs in keyed:
            ours = best_ours(rs)
            for r in rs:
                t_ratio = m_ratio = "–"
                if ours is not None:
                    t_ratio = f"{r['median_ms'] / ours['median_ms']:.2f}"
                    a, b = r.get("peak_over_inputs_mb"), ours.get("peak_over_inputs_mb")
                    if a is not None and b:
                        m_ratio = f"{a / b:.2f}"
                name = f"**{r['label']}**" if r.get("ours") else r["label"]
                frac = r.get("roofline_frac")
                frac = "–" if frac is None else f"{100 * frac:.1f}%"
                lines.append(
                    f"| {shape} | {mode} | {name} | {_fmt(r['median_ms'])} | {_rate(r)} | "
                    f"{frac} | {_fmt(r.get('peak_over_inputs_mb'))} | "
                    f"{t_ratio} | {m_ratio} | {_gate_err(r)} |"
                )
    notes = _notes(data)
    if notes:
        lines += ["", "Not timed:"] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def _gate_err(r):
    errs = [e for e in (r.get("gate_errors") or {}).values() if e is not None]
    return f"{max(errs):.1e}" if errs else "–"


def _notes(data):
    failed = [g for g in data.get("gates", []) if not g["passed"]]
    out = [f"{g['op']} / {g['impl']}: failed the correctness gate ({g['reason']})" for g in failed]
    seen = set()
    for m in data.get("not_run", []):
        key = (m["op"], m["impl"], m["reason"].split(":")[0])
        if key in seen or "correctness gate:" in m["reason"]:
            continue
        seen.add(key)
        out.append(f"{m['op']} / {m['impl']}: {m['reason']}")
    passed = [g for g in data.get("gates", []) if g["passed"]]
    if passed:
        out.append(
            "passed the correctness gate: " + ", ".join(sorted({f"{g['op']}/{g['impl']}" for g in passed}))
        )
    return out


def chart(data: dict, path) -> Path:
    """One panel per op at its first shape: median ms per impl, bars grouped by mode, log scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = []
    for op in OP_TITLES:
        keyed = [(k, rs) for k, rs in groups(data["rows"]).items() if k[0] == op]
        if keyed:
            first_shape = keyed[0][0][1]
            panels.append((op, first_shape, [(k[2], rs) for k, rs in keyed if k[1] == first_shape]))
    if not panels:
        raise ValueError("no timing rows to plot")
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 4.2), squeeze=False)
    for ax, (op, shape, modes) in zip(axes[0], panels):
        impls, ours = [], set()
        for _, rs in modes:
            impls += [r["label"] for r in rs if r["label"] not in impls]
            ours |= {r["label"] for r in rs if r.get("ours")}
        width = 0.8 / max(len(modes), 1)
        lowest = min(r["median_ms"] for _, rs in modes for r in rs)
        for j, (mode, rs) in enumerate(modes):
            by = {r["label"]: r["median_ms"] for r in rs}
            xs = [i + j * width for i, name in enumerate(impls) if name in by]
            ax.bar(xs, [by[n] for n in impls if n in by], width, label=mode)
        ax.set_xticks([i + width * (len(modes) - 1) / 2 for i in range(len(impls))])
        ax.set_xticklabels(impls, rotation=40, ha="right", fontsize=7)
        for tick, name in zip(ax.get_xticklabels(), impls):
            tick.set_fontweight("bold" if name in ours else "normal")
        ax.set_yscale("log")
        # log bars grow from the axis bottom: put it well under the shortest bar, or they mislead
        ax.set_ylim(bottom=lowest / 3)
        ax.set_ylabel("median ms (log; ours in bold)")
        ax.set_title(f"{op}: {shape}", fontsize=9)
        ax.legend(fontsize=7)
    fig.suptitle(f"{data['card']} — {data['date']} — {data['dtype']}", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _row(data, op, impl, mode, N=None, V=None):
    for r in data["rows"]:
        s = r["shape"]
        if (
            (r["op"], r["impl"], r["mode"]) == (op, impl, mode)
            and (N is None or s["N"] == N)
            and (V is None or s["V"] == V)
        ):
            return r
    return None


def goals(data: dict) -> list:
    """Issue 4's goals as (text, measured, ok or None when the row is missing)."""
    if data["device"] != "cuda":
        return [("performance goals are stated for a GPU; this file is " + data["card"], None, None)]
    out = []
    ours = _row(data, "loss", "triton", "fwd+bwd", 8192, 151936)
    liger = _row(data, "loss", "liger", "fwd+bwd", 8192, 151936)
    eager = _row(data, "loss", "trl_eager", "fwd+bwd", 8192, 151936)
    frac = ours and ours.get("roofline_frac")
    out.append(
        (
            "loss fwd+bwd N=8192 V=151936 within 1.25x of the 4NV-byte floor (fraction >= 0.8)",
            frac,
            None if frac is None else frac >= 0.8,
        )
    )
    for name, peer, need in (("Liger triton_grpo_loss", liger, 1.3), ("TRL-style eager", eager, 5.0)):
        ratio = peer["median_ms"] / ours["median_ms"] if ours and peer else None
        out.append(
            (
                f"loss fwd+bwd N=8192 V=151936 >= {need}x faster than {name}",
                ratio,
                None if ratio is None else ratio >= need,
            )
        )
    lin = _row(data, "linear", "triton", "fwd+bwd", 8192, 151936)
    lchunk = _row(data, "linear", "liger_chunked", "fwd+bwd", 8192, 151936)
    leager = _row(data, "linear", "trl_eager", "fwd+bwd", 8192, 151936)
    tf = lin and lin.get("TFLOPs")
    out.append(
        (
            "fused-linear fwd+bwd N=8192 V=151936 H=4096 >= 750 TFLOP/s (8NHV)",
            tf,
            None if tf is None else tf >= 750,
        )
    )
    ratio = lchunk["median_ms"] / lin["median_ms"] if lin and lchunk else None
    out.append(("fused-linear >= 2x faster than Liger chunked", ratio, None if ratio is None else ratio >= 2))
    mem = (
        lin["peak_over_inputs_mb"] / leager["peak_over_inputs_mb"]
        if lin and leager and leager.get("peak_over_inputs_mb")
        else None
    )
    out.append(("fused-linear peak memory <= 1/10 of eager", mem, None if mem is None else mem <= 0.1))
    return out


def update_doc(doc, body: str) -> None:
    doc = Path(doc)
    text = doc.read_text()
    if START not in text or END not in text:
        raise ValueError(f"{doc} has no {START} ... {END} markers")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    doc.write_text(f"{head}{START}\n{body}{END}{tail}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("results", help="a results JSON written by the bench run")
    p.add_argument("--md", help="write the markdown table here")
    p.add_argument("--png", help="write the bar chart here")
    p.add_argument("--update", help="replace the table between the bench-table markers of this file")
    p.add_argument("--goals", action="store_true", help="print issue 4's performance goals")
    a = p.parse_args(argv)
    data = load(a.results)
    body = markdown(data)
    if a.md:
        Path(a.md).write_text(body)
    if a.update:
        update_doc(a.update, body)
    if a.png:
        chart(data, a.png)
    if not (a.md or a.update):
        sys.stdout.write(body)
    if a.goals:
        for text, value, ok in goals(data):
            verdict = "n/a" if ok is None else ("PASS" if ok else "MISS")
            print(f"goal {verdict}: {text}" + ("" if value is None else f" (measured {value:.3g})"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
