"""The inference benchmark's outputs: markdown table, target summary and plots."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

TARGET_CONTEXT = 32768
PEER_TARGET_BATCHES = (1, 64, 512)  # Mamba-2 at or ahead of mamba_ssm's graph decode at these batch sizes
ROOFLINE_TARGET = 1.5  # constant-cache families' step within this factor of the roofline, at batch 1 and the largest
TELE_FASTER_FROM = 4096  # telescoping's batch-1 step no slower than Llama's at any context, faster from here on


def _fmt(x, spec: str = ".3g") -> str:
    return "n/a" if x is None else format(x, spec)


def _best_per_context(rows: list[dict]) -> dict[tuple[str, int], dict]:
    best: dict[tuple[str, int], dict] = {}
    for r in rows:
        key = (r["variant"], r["context"])
        if key not in best or r["decode_tok_s"] > best[key]["decode_tok_s"]:
            best[key] = r
    return best


def targets_summary(rows: list[dict]) -> dict:
    """The issue's targets, computed from the rows (None where the data is missing)."""
    by_variant: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        by_variant[r["variant"]].append(r)
    flat = {}
    for v, rs in by_variant.items():
        sizes = [r["cache_bytes_per_seq"] for r in rs]
        flat[v] = {
            "family": rs[0]["family"],
            "cache_growth": max(sizes) / min(sizes) - 1,
            "contexts": sorted({r["context"] for r in rs}),
        }
    best = _best_per_context(rows)
    at = {v: r for (v, c), r in best.items() if c == TARGET_CONTEXT}
    llama_best = max((r["decode_tok_s"] for r in at.values() if r["family"] == "llama"), default=None)
    speedup = {v: (r["decode_tok_s"] / llama_best if llama_best else None, r["batch"]) for v, r in at.items()}
    roofline_b1 = {
        f"{r['variant']}@{r['context']}": r["roofline_ratio"]
        for r in rows
        if r["family"] == "llama" and r["batch"] == 1
    }
    vs_peer = {
        f"{r['variant']}@{r['context']} b{r['batch']}": r["vs_peer"]
        for r in rows
        if r.get("vs_peer") is not None and r["batch"] in PEER_TARGET_BATCHES
    }
    return {
        "cache_growth_vs_context": flat,
        "speedup_vs_llama_at_32k_best_batch": speedup,
        "llama_batch1_measured_over_roofline": roofline_b1,
        "step_ms_vs_mamba_ssm_graph_decode": vs_peer,
        "constant_cache_measured_over_roofline": _constant_cache_roofline(rows),
        "telescoping_over_llama_batch1_ms": _telescoping_vs_llama(rows),
    }


def _constant_cache_roofline(rows: list[dict]) -> dict[str, float]:
    """measured / roofline of the non-Llama families at batch 1 and at the largest batch that ran."""
    return {
        f"{r['variant']}@{r['context']} b{r['batch']}" + (" (largest)" if r["batch"] == r.get("max_batch") else ""): (
            r["roofline_ratio"]
        )
        for r in rows
        if r["family"] != "llama"
        and r.get("roofline_ratio") is not None
        and (r["batch"] == 1 or r["batch"] == r.get("max_batch"))
    }


def _telescoping_vs_llama(rows: list[dict]) -> dict[str, dict]:
    """Each telescoping variant's batch-1 ms/step over the (first) Llama variant's, per context both
    ran: {"ratio", "context"}."""
    b1 = [r for r in rows if r["batch"] == 1]
    llama = {}
    for r in b1:
        if r["family"] == "llama":
            llama.setdefault(r["context"], r)
    return {
        f"{r['variant']}@{r['context']} vs {llama[r['context']]['variant']}": {
            "ratio": r["decode_step_ms"] / llama[r["context"]]["decode_step_ms"],
            "context": r["context"],
        }
        for r in b1
        if r["family"] == "telescoping" and r["context"] in llama
    }


def _met(ok: bool) -> str:
    return "met" if ok else "not met"


def _roofline_note(roof: dict | None) -> str:
    if not roof or not roof.get("bandwidth_gbs"):
        return "Roofline: none (no memory bandwidth for this device; pass --bandwidth_gbs)."
    peak = f"{roof['peak_tflops']:.0f} TFLOP/s dense bf16" if roof.get("peak_tflops") else "no FLOP peak"
    return (
        f"Roofline: max(bytes read and written / {roof['bandwidth_gbs']:.0f} GB/s, FLOPs / {peak}), from "
        f"{roof['source']}; "
        "decode ms/step is the median of the timed rounds."
    )


def _profile_line(row: dict) -> str:
    """One markdown bullet for a row profiled by --profile (avengers/inference/profile.py)."""
    p = row["profile"]
    step = row["decode_step_ms"]
    top = ", ".join(
        f"{k['name'][:60]} {k['ms_per_step']:.3f} ms ({k['launches_per_step']:g}x)" for k in p["top_kernels"][:5]
    )
    return (
        f"- {row['variant']} context {row['context']} batch {row['batch']}: kernels {p['kernel_ms_per_step']:.3f} "
        f"ms of the {step:.3f} ms step ({100 * p['kernel_ms_per_step'] / step:.0f}%), "
        f"{p['launches_per_step']:g} launches; largest: {top}"
    )


def markdown_table(report: dict) -> str:
    lines = [
        f"Inference benchmark on {report['device']}, torch {report['torch']}, {report['date']}, "
        f"dtype {report['config']['dtype']}, {report['wall_s']:.0f} s, decode path "
        f"{report['config'].get('decode', 'auto')}, decode attention {report['config'].get('decode_attn', 'auto')}",
        _roofline_note(report.get("roofline")),
        "",
    ]
    for name, v in report["variants"].items():
        chk = v.get("check") or {}
        lines.append(
            f"- {name}: check max rel err {_fmt(chk.get('max_rel_err'))}, "
            f"graph vs eager {_fmt(chk.get('graph_rel_err'))}"
            + (
                f", {report['config']['dtype']} batch 1 vs full forward {_fmt(chk['dtype_rel_err'])} "
                f"(tol {_fmt(chk.get('dtype_tol'))})"
                if chk.get("dtype_rel_err") is not None
                else ""
            )
            + f", chunked prefill {chk.get('chunked_prefill')}"
            + (f" ({chk['chunked_note']})" if chk.get("chunked_note") else "")
            + f", decode path {v.get('decode_path') or 'n/a'} timed {v.get('decode_mode', 'n/a')}"
            + (f"; peer: {v['peer']}" if v.get("peer") else "")
            + "".join(f"; {n}" for n in chk.get("notes", []))
            + ("".join(f"; {e}" for e in v.get("errors", [])))
        )
    peer = any("peer_step_ms" in r for r in report["rows"])
    lines += [
        "",
        "| variant | context | batch | prefill s (b=1) | decode ms/step (median) | spread (min-max) "
        "| decode tok/s | cache MiB/seq | peak GiB | max batch | roofline ms | bound | measured/roofline |"
        + (" mamba_ssm graph ms/step | ours/mamba_ssm |" if peer else ""),
        "|" + "---|" * (15 if peer else 13),
    ]
    for r in report["rows"]:
        spread = f"{r['decode_step_ms_min']:.3f}-{r['decode_step_ms_max']:.3f}" if "decode_step_ms_min" in r else "n/a"
        lines.append(
            f"| {r['variant']} | {r['context']} | {r['batch']} | {r['prefill_s']:.3f} | {r['decode_step_ms']:.3f} "
            f"| {spread} | {r['decode_tok_s']:.0f} | {r['cache_bytes_per_seq'] / 2**20:.3f} "
            f"| {_fmt(r['peak_mem_gib'], '.1f')} | {_fmt(r['max_batch'], 'd')} | {_fmt(r['roofline_ms'], '.3f')} "
            f"| {r.get('roofline_bound') or 'n/a'} | {_fmt(r['roofline_ratio'], '.2f')} |"
            + (f" {_fmt(r.get('peer_step_ms'), '.3f')} | {_fmt(r.get('vs_peer'), '.2f')} |" if peer else "")
        )
    profiled = [r for r in report["rows"] if "profile" in r]
    if profiled:
        lines += [
            "",
            "Kernel time per decode step (eager steps through the torch profiler, against the timed step; "
            "a kernel launched with programmatic dependent launch starts while its predecessor drains and "
            "counts its wait for it, so the shares can add up to more than the step):",
        ]
        lines += [_profile_line(r) for r in profiled]
    t = report["targets"]
    lines += ["", "Targets:"]
    for v, f in t["cache_growth_vs_context"].items():
        lines.append(
            f"- cache bytes/seq growth {f['contexts'][0]}..{f['contexts'][-1]}: {v} ({f['family']}) "
            f"{100 * f['cache_growth']:.2f}%"
        )
    for v, (s, b) in t["speedup_vs_llama_at_32k_best_batch"].items():
        lines.append(f"- decode tok/s vs Llama at 32k, best batch: {v} x{_fmt(s, '.2f')} (batch {b})")
    for k, ratio in t["llama_batch1_measured_over_roofline"].items():
        lines.append(f"- Llama batch 1 measured/roofline: {k} {_fmt(ratio, '.2f')}")
    for k, ratio in t.get("step_ms_vs_mamba_ssm_graph_decode", {}).items():
        lines.append(f"- decode ms/step vs mamba_ssm's graph decode (at most 1 meets the target): {k} {ratio:.2f}")
    for k, ratio in t.get("constant_cache_measured_over_roofline", {}).items():
        lines.append(
            f"- constant-cache measured/roofline (target at most {ROOFLINE_TARGET}): {k} {ratio:.2f}, "
            f"{_met(ratio <= ROOFLINE_TARGET)}"
        )
    for k, v in t.get("telescoping_over_llama_batch1_ms", {}).items():
        faster = v["context"] >= TELE_FASTER_FROM
        ok = v["ratio"] < 1 if faster else v["ratio"] <= 1
        lines.append(
            f"- telescoping / Llama batch-1 ms/step (target {'below 1' if faster else 'at most 1'}): "
            f"{k} {v['ratio']:.2f}, {_met(ok)}"
        )
    return "\n".join(lines) + "\n"


def _context_axis(ax, rows: list[dict]) -> None:
    contexts = sorted({r["context"] for r in rows})
    ax.set_xscale("log", base=2)
    ax.set_xticks(contexts, [f"{c // 1024}k" if c % 1024 == 0 else str(c) for c in contexts])
    ax.minorticks_off()


def _save(fig, ax, rows: list[dict], ylabel: str, title: str, path: Path) -> Path:
    ax.set(yscale="log", xlabel="context (tokens)", ylabel=ylabel, title=title)
    _context_axis(ax, rows)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def plot(rows: list[dict], out: Path) -> list[Path]:
    """decode tok/s vs context (best batch solid, batch 1 dashed) and cache MiB/seq vs context."""
    if not rows:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    best = _best_per_context(rows)
    variants = sorted({r["variant"] for r in rows})
    label = {r["variant"]: f"{r['variant']} ({r['family']})" for r in rows}
    fig_tok, ax_tok = plt.subplots(figsize=(7, 4.5))
    fig_mib, ax_mib = plt.subplots(figsize=(7, 4.5))
    for i, v in enumerate(variants):
        color = f"C{i}"
        pts = sorted((c, r["decode_tok_s"]) for (vv, c), r in best.items() if vv == v)
        ax_tok.plot(*zip(*pts), "o-", color=color, label=f"{label[v]}, best batch")
        b1 = sorted((r["context"], r["decode_tok_s"]) for r in rows if r["variant"] == v and r["batch"] == 1)
        if b1:
            ax_tok.plot(*zip(*b1), "x--", color=color, label=f"{label[v]}, batch 1")
        mib = sorted({(r["context"], r["cache_bytes_per_seq"] / 2**20) for r in rows if r["variant"] == v})
        ax_mib.plot(*zip(*mib), "o-", color=color, label=label[v])
    paths = [
        _save(
            fig_tok,
            ax_tok,
            rows,
            "decode tokens/s",
            "Decode throughput vs context",
            out / "decode_tok_s_vs_context.png",
        ),
        _save(
            fig_mib,
            ax_mib,
            rows,
            "cache MiB per sequence",
            "Inference cache size vs context",
            out / "cache_mib_vs_context.png",
        ),
    ]
    plt.close(fig_tok)
    plt.close(fig_mib)
    return paths


def write_report(report: dict, out: Path) -> str:
    """inference_bench.{json,md} and the two PNGs under out; returns the markdown."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "inference_bench.json").write_text(json.dumps(report, indent=1, default=str))
    md = markdown_table(report)
    (out / "inference_bench.md").write_text(md)
    plot(report["rows"], out)
    return md


def merge_reports(reports: list[dict]) -> dict:
    """One report from several runs (e.g. a variant rerun alone): each variant's rows and checks come
    from the last report that has it; the targets are recomputed over the merged rows."""
    if not reports:
        raise ValueError("merge needs at least one report")
    variants: dict[str, dict] = {}
    source: dict[str, int] = {}
    for i, rep in enumerate(reports):
        for name, v in rep["variants"].items():
            variants[name], source[name] = v, i
    rows = [r for i, rep in enumerate(reports) for r in rep["rows"] if source.get(r["variant"]) == i]
    order = list(variants)
    rows.sort(key=lambda r: (order.index(r["variant"]), r["context"], r["batch"]))
    last = reports[-1]
    backends = sorted({b for rep in reports for b in rep.get("decode_attention_backends_used", [])})
    return {
        **last,
        "variants": variants,
        "rows": rows,
        "decode_attention_backends_used": backends,
        "date": " + ".join(dict.fromkeys(rep["date"] for rep in reports)),
        "wall_s": sum(rep["wall_s"] for rep in reports),
        "merged_from": len(reports),
        "targets": targets_summary(rows),
    }
