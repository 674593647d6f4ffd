"""One table from the JSON files of scripts/bench-peers.sh: per (mode, size) our fps (e2e rows of ours.json), each
peer row's fps and ours/peer; then the peers that could not run, with the reason. --chart F.png draws grouped bars.
   report.py OUT_DIR [--peers a,b] [--chart F.png]   (--peers: these peers' files, in this order)
"""
import argparse
import glob
import json
import os
import re

SIMD = re.compile(r"^(avx|amx|fma|f16c|sse4|.*vnni|.*bf16|.*fp16)")


def series_name(r):
    return f"{r['peer']} {r['dtype']}"


def main():
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--peers", default="")
    p.add_argument("--chart")
    a = p.parse_args()
    ours, peers = None, []
    first = [os.path.join(a.out, f"{n}.json") for n in a.peers.split(",") if n]
    files = [os.path.join(a.out, "ours.json")] + [f for f in first if os.path.exists(f)]
    if not first:  # no --peers: every JSON in the folder
        files += [f for f in sorted(glob.glob(os.path.join(a.out, "*.json"))) if f not in files]
    files = [f for f in files if os.path.exists(f)]
    for f in files:
        j = json.load(open(f))
        if os.path.basename(f) == "ours.json":
            ours = j
        elif "peer" in j:
            peers.append(j)
    cpu = next((j["cpu"] for j in peers if j.get("cpu")), {"model": "?", "flags": []})
    threads = ours["threads"] if ours else next((j.get("threads") for j in peers if j.get("threads")), "?")
    print(f"CPU: {cpu['model']} (family {cpu.get('family', '?')}, model {cpu.get('model_number', '?')}), {threads} threads")
    print(f"SIMD flags: {' '.join(f for f in cpu['flags'] if SIMD.match(f))}")
    for j in peers:
        if j.get("versions"):
            print(f"  {j['peer']}: " + ", ".join(f"{k} {v}" for k, v in j["versions"].items() if v))

    # (mode, size) -> {series: fps}
    table, series = {}, []
    if ours:
        for r in ours["results"]:
            if r["section"] == "e2e" and r["name"] in ("img2img", "txt2img"):
                table.setdefault((r["name"], r["size"]), {})[f"ours {r['dtype']}"] = r["fps"]
                if f"ours {r['dtype']}" not in series:
                    series.append(f"ours {r['dtype']}")
    ours_series = list(series)
    for j in peers:
        for r in j["results"]:
            s = series_name(r)
            table.setdefault((r["name"], r["size"]), {})[s] = r["fps"]
            if s not in series:
                series.append(s)
    ref = ours_series[0] if ours_series else None
    print(f"\nfps per whole frame (ours/peer = how many times faster ours is; reference: {ref or 'none'})")
    head = f"{'mode':8s} {'size':>5s}" + "".join(f" {s:>24s}" for s in series)
    print(head)
    for (mode, size), row in sorted(table.items()):
        line = f"{mode:8s} {size:5d}"
        for s in series:
            fps = row.get(s)
            cell = "-" if fps is None else f"{fps:.3f}"
            if fps and ref and row.get(ref) and s not in ours_series:
                cell += f" (x{row[ref] / fps:.2f})"
            line += f" {cell:>24s}"
        print(line)
    skipped = [(j["peer"], s) for j in peers for s in j.get("skipped", [])]
    if skipped:
        print("\nnot measured:")
        for peer, s in skipped:
            print(f"  {peer} [{s['variant']}]: {s['reason']}")
    if a.chart and table:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        keys = sorted(table)
        fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(keys) * max(1, len(series)) / 3), 4.5))
        w = 0.8 / max(1, len(series))
        for i, s in enumerate(series):
            ax.bar([k + i * w for k in range(len(keys))], [table[key].get(s, 0) for key in keys], w, label=s)
        ax.set_xticks([k + 0.4 - w / 2 for k in range(len(keys))], [f"{m} {sz}px" for m, sz in keys])
        ax.set_ylabel("frames per second")
        ax.set_title(f"{cpu['model']}, {threads} threads", fontsize=9)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(a.chart, dpi=110)
        print(f"\nwrote {a.chart}")


if __name__ == "__main__":
    main()
