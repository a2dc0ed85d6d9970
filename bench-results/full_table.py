"""Prints the W1 to W3 and FAQ tables of one scripts/full_side_by_side.sh run.

    python3 bench-results/full_table.py TAG

Reads, in bench-results/: ours_TAG.jsonl and quaterion_TAG.jsonl (W1 cached, W3, W2),
faq_ours_TAG.jsonl and faq_quaterion_TAG.jsonl (the FAQ task, 500 epochs). The W4 table
is `python3 bench-results/w4_table.py TAG-w4`, the sweeps' tables and plots
`python3 bench-results/plots.py TAG-sweep`.
"""
import json
import os
import statistics
import subprocess
import sys

TAG = sys.argv[1]
HERE = os.path.dirname(os.path.abspath(__file__))


def lines(name):
    path = os.path.join(HERE, f"{name}_{TAG}.jsonl")
    if not os.path.exists(path):
        return []
    return [json.loads(l) for l in open(path) if l.startswith("{")]


def pct(x):
    return f"{x:.0%}"


# W1 to W3: the table of side_by_side.py, which reads the same files.
print("### W1 to W3, 10 epochs\n")
sys.stdout.flush()
subprocess.run([sys.executable, os.path.join(HERE, "side_by_side.py"), TAG, "--interleaved",
                "--w1-w3-only"], check=True)

faq = [l for l in lines("faq_ours") if l.get("workload") == "faq"]
fmm = [l for l in lines("faq_ours") if l.get("measurement") == "matmul_f32"]
qfaq = lines("faq_quaterion")
if not faq:
    sys.exit(0)


def ours_run(threads, scale, seed):
    return next((l for l in faq if l["threads_env"] == threads and l["mnrl_scale"] == scale
                 and l["seed"] == seed), None)


threads = max(l["threads_env"] for l in faq)
o = ours_run(threads, 20, 0)
plain = next((q for q in qfaq if not q["tutorial_metrics"]), None)
tut = next((q for q in qfaq if q["tutorial_metrics"]), None)
print(f"### The FAQ task, 500 epochs, {threads} threads per side\n")
print("| figure | ours (scale 20, seed 0) | Quaterion, loss only (seed 42) | ratio "
      "| Quaterion, tutorial as written (seed 43) | ratio |")
print("|---|---|---|---|---|---|")


def row(name, a, b, c, same=True):
    def r(x):
        return f"{x / a:.2f}x" if (x is not None and same) else "(not the same work)"
    def f(x):
        return "-" if x is None else (f"{x:.3f}" if x < 10 else f"{x:.2f}")
    fb, fc = f(b), f(c)
    print(f"| {name} | {f(a)} | {fb} | {r(b) if b is not None else '-'} | {fc} | {r(c) if c is not None else '-'} |")


g = lambda q, k: q.get(k) if q else None  # noqa: E731
row("cache fill s (ours: training texts; Quaterion: training and validation texts)",
    o["cache_fill_s"], g(plain, "cache_fill_s"), g(tut, "cache_fill_s"), same=False)
row("all encoding s (ours: the first evaluation, which fills the validation cache, plus the fill)",
    o["evaluate_before_s"] + o["cache_fill_s"], g(plain, "cache_fill_s"), g(tut, "cache_fill_s"))
row("epoch s (training and validation, after the 1st)", o["mean_epoch_s"],
    g(plain, "mean_epoch_s"), g(tut, "mean_epoch_s"))
row("end to end s (ours: total_s, model built to final scores; Quaterion: fit_wall_s)",
    o["total_s"], g(plain, "fit_wall_s"), g(tut, "fit_wall_s"))
row("peak RSS MB", o["peak_rss_mb"], g(plain, "peak_rss_mb"), g(tut, "peak_rss_mb"))
print(f"| other processes' CPU (ours) | {pct(o['machine_load']['other_procs_cpu_frac'])} | | | | |")
print()

print("### The FAQ task against its floor (ours)\n")
print("| threads | matmul GFLOP/s | cache fill s (ratio) | first evaluation s | epoch s (floor) "
      "| end to end s | floor s | ratio | other processes |")
print("|---|---|---|---|---|---|---|---|---|")
for l in faq:
    if l["mnrl_scale"] != 20 or l["seed"] != 0:
        continue
    gf = l["end_to_end_floor_gflop"] / l["end_to_end_floor_s"]
    ef = (l["epoch_floor_gflop"]["train"] + l["epoch_floor_gflop"]["validation"]) / gf
    print(f"| {l['threads_env']} | {gf:.1f} | {l['cache_fill_s']:.2f} ({l['fill_ratio']}) "
          f"| {l['evaluate_before_s']:.2f} | {l['mean_epoch_s']:.4f} ({ef:.4f}) | {l['total_s']:.2f} "
          f"| {l['end_to_end_floor_s']:.2f} | **{l['end_to_end_ratio']}** "
          f"| {pct(l['machine_load']['other_procs_cpu_frac'])} |")
print()

print("### Quality after 500 epochs (full validation set: 2,159 questions against all answers)\n")
print("| side | loss | seed | precision@1 | MRR |")
print("|---|---|---|---|---|")
for l in faq:
    if l["threads_env"] != threads:
        continue
    print(f"| ours | MNRL scale {l['mnrl_scale']:g} on cos | {l['seed']} "
          f"| {l['q_after']['precision_at_1']} | {l['q_after']['mrr']} |")
for q in qfaq:
    kind = "tutorial as written" if q["tutorial_metrics"] else "loss only"
    print(f"| Quaterion ({kind}) | MNRL scale 20 on (1 + cos) / 2 | {q['seed']} "
          f"| {q['p1_after']} | {q['mrr_after']} |")
s10 = [l for l in faq if l["threads_env"] == threads and l["mnrl_scale"] == 10]
if len(s10) > 1:
    p = [l["q_after"]["precision_at_1"] for l in s10]
    r = [l["q_after"]["mrr"] for l in s10]
    print(f"| ours, scale 10, {len(s10)} seeds | mean ± sd | | {statistics.mean(p):.4f} ± "
          f"{statistics.stdev(p):.4f} | {statistics.mean(r):.4f} ± {statistics.stdev(r):.4f} |")
if len(qfaq) > 1:
    p = [q["p1_after"] for q in qfaq]
    r = [q["mrr_after"] for q in qfaq]
    print(f"| Quaterion, {len(qfaq)} seeds | mean ± sd | | {statistics.mean(p):.4f} ± "
          f"{statistics.stdev(p):.4f} | {statistics.mean(r):.4f} ± {statistics.stdev(r):.4f} |")
if tut:
    m = tut["attached_metrics"]
    get = lambda name, stage: m.get(f"{name}_TrainStage.{stage}")  # noqa: E731
    print("\nThe tutorial run's attached metrics at its last epoch (batch-wise, Quaterion's own "
          f"logging): training RetrievalPrecision {get('RetrievalPrecision', 'TRAIN')}, "
          f"RetrievalReciprocalRank {get('RetrievalReciprocalRank', 'TRAIN')}; validation "
          f"{get('RetrievalPrecision', 'VALIDATION')} and "
          f"{get('RetrievalReciprocalRank', 'VALIDATION')}.")
