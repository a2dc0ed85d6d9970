"""Plots and tables of one size sweep (scripts/sweeps.sh TAG).

    python3 bench-results/plots.py TAG [--out docs/plots]

Reads bench-results/sweep_TAG.jsonl (and sweep_quaterion_TAG.jsonl where present), prints
the Markdown tables BENCHMARKS.md quotes, and writes three SVGs (matplotlib) into --out:
sweep_w1_TAG.svg (W1 cache fill and cached epoch time against the items, with their
matmul floors, and peak RSS), sweep_evaluator_TAG.svg (evaluation time and its floor, peak
RSS) and sweep_xbm_TAG.svg (W3 epoch time and its floor against the memory size). Each
floor is the point's matmul FLOPs at the matmul throughput measured at the start of the
same bench invocation, for the work the fused kernels do:

    per training step of b rows (TripletLoss hard, cosine), d = 384:
      head            2 · b · d² · 2      (forward and ∂W: the frozen encoder's output
                                           needs no ∂x, which the head's kernel skips)
      distances       b² · d              (x̂ x̂ᵀ: the upper triangle, forward only; the
                                           mined pairs' backward is O(b·d) and left out)
      W3 memory       2 · b · M · d       (M = the entries the memory holds at that step:
                                           it fills from the first step; forward only)
    cache fill        2 · (512 · 1024 + 1024 · 384) per item
    Evaluator         2 · queries · items · d

The bench's own `summary` lines in the raw files of 2026-12-01 count the head's ∂x
(`2 · b · d² · 3`), the distances as a full product with two backward products
(`3 · 2 · b² · d`) and the memory's backward, which the kernels do not compute; this script recomputes every floor from the raw sizes instead (and the
bench counts the same since the commit that added this note).
"""
import argparse
import json
import os

HERE = os.path.dirname(os.path.abspath(__file__))
P = argparse.ArgumentParser()
P.add_argument("tag")
P.add_argument("--out", default=os.path.join(HERE, "..", "docs", "plots"))
ARGS = P.parse_args()


def read(name):
    path = os.path.join(HERE, name)
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(l) for l in f if l.startswith("{")]


rows = read(f"sweep_{ARGS.tag}.jsonl")
quaterion = read(f"sweep_quaterion_{ARGS.tag}.jsonl")


def points(prefix):
    """(point name, run line, summary line, matmul line) of each point, in file order."""
    out = []
    for name in dict.fromkeys(r["point"] for r in rows if r["point"].startswith(prefix)):
        mine = [r for r in rows if r["point"] == name]
        run = next(r for r in mine if "run" in r)
        summ = next(r for r in mine if r.get("measurement") == "summary")
        mm = next(r for r in mine if r.get("measurement") == "matmul_f32")
        out.append((name, run, summ, mm))
    return out


D_IN, HIDDEN = 512, 1024


def steps(n, batch):
    return [min(batch, n - i) for i in range(0, n, batch)]


def epoch_gflop(sizes, epoch, w3):
    """Floor FLOPs (GFLOP) of training epoch `epoch` (0-based), see the module docs."""
    d, total = sizes["dim"], 0.0
    enqueued = sizes["items"] * epoch
    for b in steps(sizes["items"], sizes["batch"]):
        total += 4.0 * b * d * d + b * b * d
        if w3:
            total += 2.0 * b * min(enqueued, sizes["xbm_size"]) * d
        enqueued += b
    return total / 1e9


def floors(run, mm):
    """(cache fill floor s, mean epoch-after-first floor s) of a W1/W3 run line."""
    sizes, e, w3 = run["sizes"], run["epochs"], run["workload"] == "w3"
    rate = mm["gflops"]
    fill = sizes["items"] * 2.0 * (D_IN * HIDDEN + HIDDEN * sizes["dim"]) / 1e9
    after = [epoch_gflop(sizes, i, w3) for i in range(1 if e > 1 else 0, e)]
    return fill / rate, sum(after) / len(after) / rate


def load(r):
    return r["machine_load"]["loadavg_before"].split()[0]


def qload(q):
    """The 1-minute load average at the start of a Quaterion run (bench.py: a list)."""
    lb = q.get("machine_load", {}).get("loadavg_before", ["?"])
    return lb[0] if isinstance(lb, list) else lb.split()[0]


w1, ev, xbm = points("w1_"), points("eval_"), points("xbm_")

print("### W1 cached (TripletLoss hard, batch 256)\n")
print("| items | epochs | cache fill s | floor s | ratio | cached epoch s | floor s | ratio "
      "| peak RSS MiB | matmul GFLOP/s | load |")
print("|---|---|---|---|---|---|---|---|---|---|---|")
for name, run, s, mm in w1:
    ff, ef = floors(run, mm)
    fill, ep = run["cache_fill_s"], run["mean_epoch_train_only_after_first_s"]
    print(f"| {run['sizes']['items']:,} | {run['epochs']} | {fill:.3f} | {ff:.3f} "
          f"| {fill / ff:.2f} | {ep:.3f} | {ef:.3f} | {ep / ef:.2f} "
          f"| {run['peak_rss_mb']:.0f} | {mm['gflops']:.0f} | {load(run)} |")
for q in quaterion:
    if q.get("cache_fill_s") is not None:
        th = q["env"].get("torch_threads", 2)
        print(f"\nQuaterion 0.1.35 at {q['config']['n_train']:,} items ({q['epochs_run']} "
              f"epochs, {th} thread{'s' if th != 1 else ''}): cache fill "
              f"{q['cache_fill_s']:.3f} s, epoch (training only, after the first) "
              f"{q['mean_epoch_train_only_after_first_s']:.3f} s, fit {q['fit_wall_s']:.2f} s; "
              f"load {qload(q)}.")

print("\n### Evaluator (precision@1 and R-precision, cosine, 384 wide)\n")
print("| items | queries | evaluate s | floor s | ratio | peak RSS MiB | embeddings MiB "
      "| matmul GFLOP/s | load |")
print("|---|---|---|---|---|---|---|---|---|")
for name, run, s, mm in ev:
    print(f"| {s['items']:,} | {s['queries']:,} | {s['median']['evaluate_s']:.2f} "
          f"| {s['floor_s']['evaluate']:.3f} | {s['ratio']['evaluate']:.1f} "
          f"| {s['median']['peak_rss_mb']:.0f} | {run['embeddings_mb']:.0f} "
          f"| {mm['gflops']:.0f} | {load(run)} |")

print("\n### W3: XBM (20,000 items, memory from the first step)\n")
print("| entries | epochs | epoch s | floor s | ratio | peak RSS MiB | matmul GFLOP/s | load |")
print("|---|---|---|---|---|---|---|---|")
for name, run, s, mm in xbm:
    _, ef = floors(run, mm)
    ep = run["mean_epoch_train_only_after_first_s"]
    print(f"| {run['sizes']['xbm_size']:,} | {run['epochs']} | {ep:.3f} | {ef:.3f} "
          f"| {ep / ef:.2f} | {run['peak_rss_mb']:.0f} | {mm['gflops']:.0f} | {load(run)} |")

try:
    import matplotlib
    matplotlib.use("svg")
    import matplotlib.pyplot as plt
except ImportError:
    raise SystemExit("\n(no matplotlib: tables only)")

os.makedirs(ARGS.out, exist_ok=True)
plt.rcParams.update({"font.size": 9, "svg.hashsalt": ARGS.tag, "svg.fonttype": "none"})


def save(fig, name):
    path = os.path.join(ARGS.out, f"sweep_{name}_{ARGS.tag}.svg")
    fig.tight_layout()
    fig.savefig(path, metadata={"Date": None})
    plt.close(fig)
    print(f"wrote {os.path.relpath(path)}")


if w1:
    n = [run["sizes"]["items"] for _, run, _, _ in w1]
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.4))
    for key, k, label, c in [("cache_fill_s", 0, "cache fill", "C0"),
                             ("mean_epoch_train_only_after_first_s", 1, "cached epoch", "C1")]:
        t = [run[key] for _, run, _, _ in w1]
        f = [floors(run, mm)[k] for _, run, _, mm in w1]
        a.plot(n, t, "o-", color=c, label=label)
        a.plot(n, f, "--", color=c, label=f"{label}: matmul floor")
        for x, tv, fv in zip(n, t, f):
            a.annotate(f"{tv / fv:.2f}x", (x, tv), textcoords="offset points",
                       xytext=(4, -10), fontsize=7, color=c)
    for q in quaterion:
        if q.get("cache_fill_s") is not None:
            items = q["config"]["n_train"]
            a.plot([items], [q["cache_fill_s"]], "s", color="C0", mfc="none",
                   label="Quaterion cache fill")
            a.plot([items], [q["mean_epoch_train_only_after_first_s"]], "s", color="C1",
                   mfc="none", label="Quaterion epoch")
    a.set(xscale="log", yscale="log", xlabel="items", ylabel="seconds",
          title="W1 cached: time (ratio to floor)")
    a.legend(fontsize=7)
    b.plot(n, [run["peak_rss_mb"] for _, run, _, _ in w1], "o-", color="C2",
           label="peak RSS")
    b.plot(n, [x * 512 * 4 / 2**20 for x in n], ":", color="grey",
           label="input matrix (items × 512 f32)")
    b.plot(n, [x * 384 * 4 / 2**20 for x in n], "--", color="grey",
           label="cache (items × 384 f32)")
    b.plot(n, [x * (512 + 384) * 4 / 2**20 for x in n], "-", color="lightgrey",
           label="input matrix + cache")
    b.set(xscale="log", yscale="log", xlabel="items", ylabel="MiB", title="W1 cached: memory")
    b.legend(fontsize=7)
    save(fig, "w1")

if ev:
    n = [s["items"] for _, _, s, _ in ev]
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.4))
    # Per query: the points rank different numbers of queries (a sample at 1M).
    per_q = [1e3 * s["median"]["evaluate_s"] / s["queries"] for _, _, s, _ in ev]
    a.plot(n, per_q, "o-", color="C0", label="evaluate, per query")
    a.plot(n, [1e3 * s["floor_s"]["evaluate"] / s["queries"] for _, _, s, _ in ev], "--",
           color="C0", label="matmul floor (distances), per query")
    for x, y, (_, _, s, _) in zip(n, per_q, ev):
        a.annotate(f"{s['ratio']['evaluate']:.1f}x, {s['queries']:,} q", (x, y),
                   textcoords="offset points", xytext=(4, -10), fontsize=7)
    a.set(xscale="log", yscale="log", xlabel="items (candidates per query)",
          ylabel="ms per query", title="Evaluator: time per query (ratio to floor)")
    a.legend(fontsize=7)
    b.plot(n, [s["median"]["peak_rss_mb"] for _, _, s, _ in ev], "o-", color="C2",
           label="peak RSS")
    b.plot(n, [run["embeddings_mb"] for _, run, _, _ in ev], "--", color="grey",
           label="embeddings (items × 384 f32)")
    b.set(xscale="log", yscale="log", xlabel="items", ylabel="MiB", title="Evaluator: memory")
    b.legend(fontsize=7)
    save(fig, "evaluator")

if xbm:
    n = [run["sizes"]["xbm_size"] for _, run, _, _ in xbm]
    fig, a = plt.subplots(figsize=(4.8, 3.4))
    t = [run["mean_epoch_train_only_after_first_s"] for _, run, _, _ in xbm]
    f = [floors(run, mm)[1] for _, run, _, mm in xbm]
    a.plot(n, t, "o-", color="C1", label="epoch (after the first)")
    a.plot(n, f, "--", color="C1", label="matmul floor")
    for x, tv, fv in zip(n, t, f):
        a.annotate(f"{tv / fv:.2f}x", (x, tv), textcoords="offset points",
                   xytext=(4, -10), fontsize=7)
    a.set(xscale="log", yscale="log", xlabel="memory entries",
          ylabel="seconds", title="W3 (XBM, 20,000 items): epoch time")
    a.legend(fontsize=7)
    save(fig, "xbm")
