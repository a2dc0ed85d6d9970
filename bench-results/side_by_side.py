"""Prints the side-by-side tables of BENCHMARKS.md from one back-to-back session.

    python3 bench-results/side_by_side.py DATE
    python3 bench-results/side_by_side.py TAG --interleaved

With `--w1-w3-only` it stops after the W1 to W3 table (`full_table.py` prints that table
of a scripts/full_side_by_side.sh run this way).

The second form reads the interleaved session of the fused kernels (bench-results/run
order in side_by_side_TAG.log): ours_TAG.jsonl (bench --w1/--w3/--w2 --runs 3),
ours_w4_TAG.jsonl, quaterion_TAG.jsonl (bench.py --w1 --w1-cache auto, --w3-active, --w2,
--w4), and the FAQ at 500 epochs measured on both sides (ours_faq_500_TAG.jsonl,
quaterion_faq_500_TAG.jsonl).

The first form

reads, in bench-results/:
  ours_all_DATE.jsonl            cargo run --release --example bench -- --all (CANDLE_NUM_THREADS=1)
  quaterion_rerun_DATE.jsonl     Quaterion's bench.py --w1, --w2, --w3-active, --w4
  ours_faq_50_DATE.jsonl         bench --faq DIR --epochs 50 (default threading)
  quaterion_faq_50_DATE.jsonl    scripts/quaterion_faq.py --epochs 50
  ours_faq_500_DATE.jsonl        bench --faq DIR --epochs 500
"""
import json
import os
import sys

DATE = sys.argv[1]
HERE = os.path.dirname(os.path.abspath(__file__))


def lines(name):
    path = os.path.join(HERE, f"{name}_{DATE}.jsonl")
    if not os.path.exists(path):
        return []
    return [json.loads(l) for l in open(path) if l.startswith("{")]


INTERLEAVED = "--interleaved" in sys.argv
if INTERLEAVED:
    ours = lines("ours") + lines("ours_w4")
    quat = {l["workload"]: l for l in lines("quaterion")}
else:
    ours = lines("ours_all")
    quat = {l["workload"]: l for l in lines("quaterion_rerun")}
QNAME = {"w1_cached": "w1_group_triplet_cached", "w1_uncached": "w1_group_triplet_nocache",
         "w2": "w2_pairs_contrastive_cached", "w3": "w3_group_triplet_cached_xbm_start0"}


def pct(x):
    return f"{x:.0%}"


mm = next((l for l in ours if l.get("measurement") == "matmul_f32"), None)
if mm:
    print(f"matmul 2048^3 (ours, same session): {mm['gflops']} GFLOP/s, other processes {pct(mm['machine_load']['other_procs_cpu_frac'])}\n")
print("| workload | figure | ours (median of 3) | floor | ours / floor | Quaterion (this session) | Quaterion / ours |")
print("|---|---|---|---|---|---|---|")
runs = {}
for l in ours:
    if "run" in l:
        runs.setdefault(l["workload"], []).append(l)
for l in ours:
    if l.get("measurement") != "summary":
        continue
    w, m = l["workload"], l["median"]
    q = quat.get(QNAME[w], {})
    for key, fig, fk in [("cache_fill_s", "cache fill s", "cache_fill"),
                         ("mean_epoch_train_only_after_first_s", "epoch s (train only, after 1st)", "epoch"),
                         ("fit_wall_s", "fit wall s", "fit")]:
        if w == "w1_uncached" and fk == "cache_fill":
            continue
        o, qv = m[key], q.get(key)
        sp = f"{qv / o:.2f}x" if qv else "-"
        print(f"| {w} | {fig} | {o:.3f} | {l['floor_s'][fk]:.3f} | {l['ratio'][fk]} | {qv if qv else '-'} | {sp} |")
    r = runs[w]
    pk = "val_group_precision_at_1" if w == "w2" else "val_precision_at_1"
    qb, qa = q.get("q_before", {}), q.get("q_after", {})
    qk = "val_group_precision_at_1" if w == "w2" else "val_precision_at_1"
    qp = f"{qb.get(qk)} -> {qa.get(qk)}" if qb else "-"
    print(f"| {w} | matmul throughput reached in an epoch | {1 / l['ratio']['epoch']:.0%} of 2048^3 | | | | |")
    print(f"| {w} | peak RSS MB | {m['peak_rss_mb']:.0f} | | | not recorded by bench.py | |")
    print(f"| {w} | P@1 before -> after | {r[0]['q_before'][pk]} -> {r[0]['q_after'][pk]} | | | {qp} | |")
    ql = q.get("machine_load", {}).get("other_procs_cpu_frac")
    print(f"| {w} | other processes' CPU | {pct(m['other_procs_cpu_frac'])} | | | {pct(ql) if ql is not None else '-'} | |")
print()
for w, rs in runs.items():
    print(w, "per-run epoch s:", [r["mean_epoch_train_only_after_first_s"] for r in rs],
          "fit s:", [r["fit_wall_s"] for r in rs], "other:", [r["machine_load"]["other_procs_cpu_frac"] for r in rs])
print()
if "--w1-w3-only" in sys.argv:
    sys.exit(0)

q4 = quat.get("w4_loss_microbench", {})
qd = q4.get("details", {})
print(f"W4 (Quaterion other processes: {pct(q4['machine_load']['other_procs_cpu_frac']) if q4 else '-'})\n")
print("| loss | batch | ours median ms (min) | other procs | Quaterion median ms (min) | Quaterion / ours |")
print("|---|---|---|---|---|---|")
for l in ours:
    if l.get("measurement") != "w4_loss":
        continue
    q = qd.get(l["loss"])
    qs = f"{q['median_ms']:.2f} ({q['min_ms']:.2f})" if q else "-"
    sp = f"{q['median_ms'] / l['median_ms']:.2f}x" if q else "-"
    print(f"| {l['loss']} | {l['batch']} | {l['median_ms']:.2f} ({l['min_ms']:.2f}) | "
          f"{pct(l['machine_load']['other_procs_cpu_frac'])} | {qs} | {sp} |")
for name in ("TripletLoss_all",):
    if name in qd:
        print(f"| {name} (Quaterion only) | 1024 | - | | {qd[name]['median_ms']:.0f} | |")
print()

if INTERLEAVED:
    o, q = lines("ours_faq_500"), lines("quaterion_faq_500")
    o = next((l for l in o if l.get("workload") == "faq"), None)
    q = q[0] if q else None
    if o and q:
        print("FAQ, 500 epochs, both measured, back to back (Quaterion first)\n")
        print("| figure | ours | Quaterion | Quaterion / ours |")
        print("|---|---|---|---|")
        rows = [
            ("cache fill, training texts s (Quaterion: training + validation texts)", o["cache_fill_s"], q["cache_fill_s"], False),
            ("validation texts embedded before training s", o["evaluate_before_s"], q["eval_embed_s"], False),
            ("all encoding s", o["evaluate_before_s"] + o["cache_fill_s"], q["cache_fill_s"] + q["eval_embed_s"], True),
            ("epoch s (training + validation, after 1st)", o["mean_epoch_s"], q["mean_epoch_s"], True),
            ("fit wall s", o["fit_wall_s"], q["fit_wall_s"], True),
            ("end to end s (model built to final scores)", o["total_s"], q["eval_embed_s"] + q["fit_wall_s"], True),
            ("peak RSS MB", o["peak_rss_mb"], q["peak_rss_mb"], True),
        ]
        for name, a, b, comparable in rows:
            ratio = f"{b / a:.2f}x" if comparable else "(not the same work)"
            print(f"| {name} | {a:.2f} | {b:.2f} | {ratio} |")
        print(f"| P@1 before -> after (full set) | {o['q_before']['precision_at_1']} -> {o['q_after']['precision_at_1']} | "
              f"{q['p1_before']} -> {q['p1_after']} | |")
        print(f"| MRR before -> after (full set) | {o['q_before']['mrr']} -> {o['q_after']['mrr']} | "
              f"{q['mrr_before']} -> {q['mrr_after']} | |")
        print(f"| other processes' CPU | {pct(o['machine_load']['other_procs_cpu_frac'])} | not recorded | |")
        print(f"| fill ratio to its matmul floor (ours) | {o.get('fill_ratio')} | | |")
    sys.exit(0)

of, qf, o500 = lines("ours_faq_50"), lines("quaterion_faq_50"), lines("ours_faq_500")
of = next((l for l in of if l.get("workload") == "faq"), None)
o500 = next((l for l in o500 if l.get("workload") == "faq"), None)
qf = qf[0] if qf else None
if of and qf:
    print("FAQ, 50 epochs, back to back\n")
    print("| figure | ours | Quaterion | Quaterion / ours |")
    print("|---|---|---|---|")
    o_fill = of["evaluate_before_s"] + of["cache_fill_s"]
    q_fill = qf["cache_fill_s"] + qf["eval_embed_s"]
    rows = [
        ("cache fill, training texts s (Quaterion: training + validation texts)", of["cache_fill_s"], qf["cache_fill_s"]),
        ("validation texts embedded before training s", of["evaluate_before_s"], qf["eval_embed_s"]),
        ("all encoding s", o_fill, q_fill),
        ("epoch s (training + validation, after 1st)", of["mean_epoch_s"], qf["mean_epoch_s"]),
        ("fit wall s", of["fit_wall_s"], qf["fit_wall_s"]),
        ("end to end s (model built to final scores)", of["total_s"], qf["eval_embed_s"] + qf["fit_wall_s"]),
        ("peak RSS MB", of["peak_rss_mb"], qf["peak_rss_mb"]),
    ]
    comparable = {"all encoding s", "epoch s (training + validation, after 1st)", "fit wall s",
                  "end to end s (model built to final scores)", "peak RSS MB"}
    for name, o, q in rows:
        ratio = f"{q / o:.2f}x" if name in comparable else "(not the same work)"
        print(f"| {name} | {o:.2f} | {q:.2f} | {ratio} |")
    print(f"| P@1 before -> after (full set) | {of['q_before']['precision_at_1']} -> {of['q_after']['precision_at_1']} | "
          f"{qf['p1_before']} -> {qf['p1_after']} | |")
    print(f"| MRR before -> after (full set) | {of['q_before']['mrr']} -> {of['q_after']['mrr']} | "
          f"{qf['mrr_before']} -> {qf['mrr_after']} | |")
    print(f"| other processes' CPU | {pct(of['machine_load']['other_procs_cpu_frac'])} | not recorded | |")
    print(f"| fill ratio to its matmul floor (ours) | {of.get('fill_ratio')} | | |")
    if o500:
        q_total_500 = qf["eval_embed_s"] + qf["cache_fill_s"] + 500 * qf["mean_epoch_s"]
        print("\nFAQ, 500 epochs\n")
        print("| figure | ours (measured) | Quaterion (this session's fill + 500 x its epoch) | Quaterion / ours |")
        print("|---|---|---|---|")
        print(f"| end to end s | {o500['total_s']:.1f} | {q_total_500:.1f} | {q_total_500 / o500['total_s']:.2f}x |")
        print(f"| epoch s | {o500['mean_epoch_s']:.3f} | {qf['mean_epoch_s']:.3f} | {qf['mean_epoch_s'] / o500['mean_epoch_s']:.2f}x |")
        print(f"| peak RSS MB | {o500['peak_rss_mb']:.0f} | {qf['peak_rss_mb']:.0f} (50-epoch run) | {qf['peak_rss_mb'] / o500['peak_rss_mb']:.2f}x |")
        print(f"| P@1 before -> after | {o500['q_before']['precision_at_1']} -> {o500['q_after']['precision_at_1']} | | |")
        print(f"| MRR before -> after | {o500['q_before']['mrr']} -> {o500['q_after']['mrr']} | | |")
        print(f"| other processes' CPU | {pct(o500['machine_load']['other_procs_cpu_frac'])} | | |")
