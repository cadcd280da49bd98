"""The benchmark's plot, from results.json (Debian's python3-matplotlib, no display needed).

    /usr/bin/python3 benches/prosody/plot.py [target/bench/results.json]
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any, Dict, List

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

COLORS = {"dmuc": "#1f77b4", "plain": "#d62728"}
LABELS = {"dmuc": "dmuc (mirror)", "plain": "plain MUC"}


def _sweep(res: Dict[str, Any], mode: str, event: str) -> tuple:
    sweep = res["modes"].get(mode, {}).get("sweep", {})
    ks = sorted((int(k) for k in sweep if event in sweep[k]))
    return ks, [sweep[str(k)][event]["bytes"] for k in ks]


def plot(res: Dict[str, Any], out_dir: str) -> List[str]:
    fig, axes = plt.subplots(2, 2, figsize=(12, 9))
    fig.suptitle("dmuc vs plain MUC on real Prosody servers: what crosses the s2s link, and what users see",
                 fontsize=12)

    # 1. Bytes per groupchat message vs K.
    ax = axes[0][0]
    for mode in ("dmuc", "plain"):
        for event, style, what in (("msg_master", "-o", "from master side"), ("msg_mirror", "--s", "from mirror side")):
            ks, ys = _sweep(res, mode, event)
            if ks:
                ax.plot(ks, ys, style, color=COLORS[mode], label=f"{LABELS[mode]}, {what}")
    for mode in ("dmuc", "plain"):
        m3 = res["modes"].get(mode, {}).get("mirrors3")
        if m3 and "msg_master" in m3:
            k = m3["servers"] * m3["occupants_per_server"]
            ax.plot([k], [m3["msg_master"]["bytes"]], "*", markersize=13, color=COLORS[mode],
                    label=f"{LABELS[mode]}, 3 mirrors x {m3['occupants_per_server']}, from master side")
    _log_axes(ax, "remote occupants K (one mirror; stars: 3 mirrors)", "s2s bytes per groupchat message")
    ax.set_title("groupchat message")
    ax.legend(fontsize=8)

    # 2. Bytes per remote join and per presence change vs K.
    ax = axes[0][1]
    for mode in ("dmuc", "plain"):
        for event, style, what in (("join", "-o", "remote join"), ("presence_master", ":^", "presence change (master side)")):
            ks, ys = _sweep(res, mode, event)
            if ks:
                ax.plot(ks, ys, style, color=COLORS[mode], label=f"{LABELS[mode]}, {what}")
    _log_axes(ax, "remote occupants K (one mirror)", "s2s bytes per event")
    ax.set_title("remote join (the K-th) and presence change")
    ax.legend(fontsize=8)

    # 3. Latency over a 600 ms RTT link.
    ax = axes[1][0]
    keys = [("echo_mirror_user", "own echo,\nmirror user"), ("same_side_mirror", "to another user\non the mirror side"),
            ("to_master_side", "mirror side\n-> master side"), ("to_mirror_side_all", "master side\n-> all K on mirror side"),
            ("join_time", "remote join\nuntil complete")]
    width = 0.4
    for i, mode in enumerate(("dmuc", "plain")):
        lat = res["modes"].get(mode, {}).get("latency")
        if not lat:
            continue
        xs = [j + (i - 0.5) * width for j in range(len(keys))]
        p50 = [lat[k]["p50"] * 1000 if k in lat else 0 for k, _ in keys]
        p99 = [lat[k]["p99"] * 1000 if k in lat else 0 for k, _ in keys]
        ax.bar(xs, p50, width, color=COLORS[mode], label=f"{LABELS[mode]} p50")
        ax.scatter(xs, p99, color="black", marker="_", s=200, zorder=3, label="p99" if i == 0 else None)
        for x, y in zip(xs, p50):
            ax.annotate(f"{y:.0f}", (x, y), ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(keys)))
    ax.set_xticklabels([label for _, label in keys], fontsize=7)
    ax.set_ylabel("ms (bars: p50, marks: p99)")
    ax.set_title("latency over a 600 ms RTT link (K=20)")
    top = max([b.get_height() for b in ax.patches] + [1])
    ax.set_ylim(0, top * 1.3)
    ax.legend(fontsize=8, loc="upper center", ncol=3)

    # 4. Sustained message rate at 9.6 kbit/s, and Prosody CPU.
    ax = axes[1][1]
    rates = [(mode, res["modes"].get(mode, {}).get("rate", {}).get("sustained_per_min")) for mode in ("dmuc", "plain")]
    rates = [(m, r) for m, r in rates if r]
    if rates:
        bars = ax.bar([LABELS[m] for m, _ in rates], [r for _, r in rates], color=[COLORS[m] for m, _ in rates])
        for b, (_, r) in zip(bars, rates):
            ax.annotate(f"{r:.1f}/min", (b.get_x() + b.get_width() / 2, r), ha="center", va="bottom", fontsize=9)
        if len(rates) == 2 and rates[1][1]:
            ax.text(0.75, 0.5, f"dmuc / plain = {rates[0][1] / rates[1][1]:.1f}x", transform=ax.transAxes,
                    ha="center", fontsize=11)
        ax.set_ylim(0, max(r for _, r in rates) * 1.15)
    ax.set_ylabel("groupchat messages per minute, no backlog")
    ax.set_title("rate a K=20 room sustains on a 9.6 kbit/s link")

    meta = res.get("meta", {})
    fig.text(0.01, 0.005, f"one run, {meta.get('started', '')}, {meta.get('machine', '')}, Prosody "
             f"{meta.get('prosody', '')}; bytes are the stanzas' XML on the s2s streams", fontsize=7, color="gray")
    fig.tight_layout(rect=(0, 0.02, 1, 0.96))
    paths = []
    for ext in ("png", "svg"):
        path = os.path.join(out_dir, f"bench.{ext}")
        fig.savefig(path, dpi=110)
        paths.append(path)
    plt.close(fig)
    return paths


def _log_axes(ax, xlabel: str, ylabel: str) -> None:
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, which="both", alpha=0.3)


if __name__ == "__main__":
    path = sys.argv[1] if len(sys.argv) > 1 else os.path.join("target", "bench", "results.json")
    with open(path) as f:
        print("\n".join(plot(json.load(f), os.path.dirname(os.path.abspath(path)))))
