#!/usr/bin/env python3
"""Turn Google Benchmark JSON from bench_bd (and any benchmark with the same counters) into a
markdown table, and a plot when matplotlib is installed (pip install matplotlib).

    build/bench/bench_bd --benchmark_filter=BM_kv_up_projection/ \
        --benchmark_out=bd.json --benchmark_out_format=json
    python3 scripts/perf-table.py bd.json --out docs/perf/bd

writes docs/perf/bd.md (the machine from the JSON's context and /proc/cpuinfo, then one row per
benchmark: times, GFLOP/s, the fraction of the fp32 peak measured in the same run, ratios) and
docs/perf/bd.png. Every speed in it is relative to the peak or to another contestant measured in the
same run, never a bare time from elsewhere.
"""
import argparse
import json
import os
import re
import sys


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
    except OSError:
        return "unknown CPU"
    model = re.search(r"^model name\s*:\s*(.*)$", text, re.M)
    family = re.search(r"^cpu family\s*:\s*(\d+)$", text, re.M)
    number = re.search(r"^model\s*:\s*(\d+)$", text, re.M)
    flags = re.search(r"^flags\s*:\s*(.*)$", text, re.M)
    isa = []
    if flags:
        fl = flags.group(1).split()
        for name in ("avx2", "fma", "avx512f", "avx512_bf16"):
            if name in fl:
                isa.append(name)
    parts = [model.group(1).strip() if model else "unknown CPU"]
    if family and number:
        parts.append("family %s model %s" % (family.group(1), number.group(1)))
    parts.append(", ".join(isa) if isa else "no AVX2")
    return "; ".join(parts)


# Columns shown when a benchmark has them: (counter, header, format).
COLUMNS = [
    ("peak_GFLOPs", "peak GFLOP/s", "%.0f"),
    ("dense_ms", "dense ms", "%.3f"),
    ("gemm_ms", "Eigen GEMM ms", "%.3f"),
    ("onednn_ms", "oneDNN GEMM ms", "%.3f"),
    ("bd_fp32_ms", "fp32 BD ms", "%.3f"),
    ("bd_ms", "BD ms", "%.3f"),
    ("bd_shared_ms", "BD one basis ms", "%.3f"),
    ("bd_per_head_ms", "BD basis per kv head ms", "%.3f"),
    ("dense_peak", "dense / peak", "%.0f%%"),
    ("gemm_peak", "Eigen GEMM / peak", "%.0f%%"),
    ("onednn_peak", "oneDNN GEMM / peak", "%.0f%%"),
    ("bd_fp32_peak", "fp32 BD / peak", "%.0f%%"),
    ("bd_peak", "BD / peak", "%.0f%%"),
    ("bd_shared_peak", "BD one basis / peak", "%.0f%%"),
    ("bd_per_head_peak", "BD per kv head / peak", "%.0f%%"),
    ("median_GFLOPs", "GFLOP/s", "%.1f"),
    ("peak_frac", "/ peak", "%.0f%%"),
    ("ratio", "dense / BD", "%.3f"),
    ("ratio_fastest", "fastest dense / BD", "%.3f"),
    ("ratio_fp32", "fp32 BD / BD", "%.3f"),
    ("ratio_shared", "fastest dense / BD one basis", "%.3f"),
    ("ratio_per_head", "fastest dense / BD per kv head", "%.3f"),
    ("per_head_cost", "per kv head / one basis (time)", "%.3f"),
]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("json", help="Google Benchmark JSON (--benchmark_out_format=json)")
    ap.add_argument("--out", required=True, help="output path without extension (writes .md, and .png)")
    args = ap.parse_args()
    with open(args.json) as f:
        data = json.load(f)
    rows = [b for b in data.get("benchmarks", []) if b.get("run_type", "iteration") == "iteration"]
    if not rows:
        sys.exit("perf-table: no benchmark rows in %s" % args.json)
    cols = [c for c in COLUMNS if any(c[0] in r for r in rows)]
    ctx = data.get("context", {})
    lines = ["# %s" % os.path.basename(args.out), ""]
    lines.append("Machine: %s; %s CPUs reported by the benchmark library; run %s." %
                 (cpu_model(), ctx.get("num_cpus", "?"), ctx.get("date", "?")))
    lines.append("Made by scripts/perf-table.py from %s (%s)." % (os.path.basename(args.json),
                 ctx.get("executable", "the benchmark")))
    lines.append("")
    lines.append("| benchmark | " + " | ".join(c[1] for c in cols) + " |")
    lines.append("| --- | " + " | ".join("---" for _ in cols) + " |")
    for r in rows:
        cells = []
        for key, _, fmt in cols:
            if key not in r:
                cells.append("")
            elif fmt.endswith("%%"):
                cells.append(fmt % (100 * r[key]))
            else:
                cells.append(fmt % r[key])
        name = re.sub(r"/(min_time:[0-9.]+|manual_time|real_time)", "", r["name"])
        lines.append("| %s | %s |" % (name, " | ".join(cells)))
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print("perf-table: wrote %s.md" % args.out)
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("perf-table: matplotlib not installed, no plot (pip install matplotlib)")
        return
    keys = [k for k in ("dense_peak", "gemm_peak", "onednn_peak", "bd_fp32_peak", "bd_peak", "bd_shared_peak",
                        "bd_per_head_peak", "peak_frac") if any(k in r for r in rows)]
    if not keys:
        return
    names = [re.sub(r"/(min_time:[0-9.]+|manual_time|real_time|iterations:[0-9]+)", "", r["name"]) for r in rows]
    prefix = os.path.commonprefix(names)
    prefix = prefix[: prefix.rfind("/") + 1] if "/" in prefix else ""
    labels = [n[len(prefix):] for n in names]
    fig, ax = plt.subplots(figsize=(max(6, len(rows) * 1.3), 4.2))
    width = 0.8 / len(keys)
    for i, k in enumerate(keys):
        ax.bar([j + i * width for j in range(len(rows))], [100 * r.get(k, 0) for r in rows], width,
               label=k.replace("_peak", ""))
    ax.set_xticks([j + width * (len(keys) - 1) / 2 for j in range(len(rows))])
    ax.set_xticklabels(labels, rotation=20, ha="right", fontsize=8)
    ax.set_ylim(0, max(100, 10 * int(1 + max(100 * r.get(k, 0) for r in rows for k in keys) / 10)))
    ax.set_ylabel("% of the measured fp32 peak")
    ax.set_title("%s\n%s" % (prefix.rstrip("/"), cpu_model()), fontsize=8)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out + ".png", dpi=120)
    print("perf-table: wrote %s.png" % args.out)


if __name__ == "__main__":
    main()
