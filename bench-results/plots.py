"""Plots and tables of one size sweep (scripts/sweeps.sh TAG).

    python3 bench-results/plots.py TAG [--out docs/plots]

Reads bench-results/sweep_TAG.jsonl (and sweep_quaterion_TAG.jsonl where present), prints
the Markdown tables BENCHMARKS.md quotes, and writes three SVGs (matplotlib) into --out:
sweep_w1_TAG.svg (W1 cache fill and cached epoch time against the items, with their
matmul floors, and peak RSS), sweep_evaluator_TAG.svg (evaluation time and its floor, peak
RSS) and sweep_xbm_TAG.svg (W3 epoch time and its floor against the memory size). Each
floor is the point's matmul FLOPs at the matmul throughput measured at the start of the
same bench invocation (the bench's `summary` lines).
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
    print(f"| {run['sizes']['items']:,} | {run['epochs']} | {s['median']['cache_fill_s']:.3f} "
          f"| {s['floor_s']['cache_fill']:.3f} | {s['ratio']['cache_fill']:.2f} "
          f"| {s['median']['mean_epoch_train_only_after_first_s']:.3f} "
          f"| {s['floor_s']['epoch']:.3f} | {s['ratio']['epoch']:.2f} "
          f"| {s['median']['peak_rss_mb']:.0f} | {mm['gflops']:.0f} | {load(run)} |")
for q in quaterion:
    if q.get("cache_fill_s") is not None:
        print(f"\nQuaterion 0.1.35 at {q['config']['n_train']:,} items ({q['epochs_run']} "
              f"epochs, {q['env'].get('torch_threads', 2)} threads): cache fill "
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
    print(f"| {run['sizes']['xbm_size']:,} | {run['epochs']} "
          f"| {s['median']['mean_epoch_train_only_after_first_s']:.3f} "
          f"| {s['floor_s']['epoch']:.3f} | {s['ratio']['epoch']:.2f} "
          f"| {s['median']['peak_rss_mb']:.0f} | {mm['gflops']:.0f} | {load(run)} |")

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
    for key, floor, label, c in [("cache_fill_s", "cache_fill", "cache fill", "C0"),
                                 ("mean_epoch_train_only_after_first_s", "epoch",
                                  "cached epoch", "C1")]:
        a.plot(n, [s["median"][key] for _, _, s, _ in w1], "o-", color=c, label=label)
        a.plot(n, [s["floor_s"][floor] for _, _, s, _ in w1], "--", color=c,
               label=f"{label}: matmul floor")
        for x, (_, _, s, _) in zip(n, w1):
            a.annotate(f"{s['ratio'][floor]:.2f}x", (x, s["median"][key]),
                       textcoords="offset points", xytext=(4, -10), fontsize=7, color=c)
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
    b.plot(n, [s["median"]["peak_rss_mb"] for _, _, s, _ in w1], "o-", color="C2",
           label="peak RSS")
    b.plot(n, [x * 512 * 4 / 2**20 for x in n], ":", color="grey",
           label="input matrix (items × 512 f32)")
    b.plot(n, [x * 384 * 4 / 2**20 for x in n], "--", color="grey",
           label="cache (items × 384 f32)")
    b.set(xscale="log", yscale="log", xlabel="items", ylabel="MiB", title="W1 cached: memory")
    b.legend(fontsize=7)
    save(fig, "w1")

if ev:
    n = [s["items"] for _, _, s, _ in ev]
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.4))
    a.plot(n, [s["median"]["evaluate_s"] for _, _, s, _ in ev], "o-", color="C0",
           label="evaluate")
    a.plot(n, [s["floor_s"]["evaluate"] for _, _, s, _ in ev], "--", color="C0",
           label="matmul floor (distances)")
    for x, (_, _, s, _) in zip(n, ev):
        a.annotate(f"{s['ratio']['evaluate']:.1f}x, {s['queries']:,} q",
                   (x, s["median"]["evaluate_s"]), textcoords="offset points",
                   xytext=(4, -10), fontsize=7)
    a.set(xscale="log", yscale="log", xlabel="items", ylabel="seconds",
          title="Evaluator: time (ratio to floor, queries)")
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
    a.plot(n, [s["median"]["mean_epoch_train_only_after_first_s"] for _, _, s, _ in xbm],
           "o-", color="C1", label="epoch (after the first)")
    a.plot(n, [s["floor_s"]["epoch"] for _, _, s, _ in xbm], "--", color="C1",
           label="matmul floor")
    for x, (_, _, s, _) in zip(n, xbm):
        a.annotate(f"{s['ratio']['epoch']:.2f}x",
                   (x, s["median"]["mean_epoch_train_only_after_first_s"]),
                   textcoords="offset points", xytext=(4, -10), fontsize=7)
    a.set(xscale="log", yscale="log", xlabel="memory entries",
          ylabel="seconds", title="W3 (XBM, 20,000 items): epoch time")
    a.legend(fontsize=7)
    save(fig, "xbm")
