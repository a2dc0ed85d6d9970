"""Prints the BENCHMARKS.md tables from a `bench --all` output file (JSON lines)."""
import json, sys

Q = {  # Quaterion's recorded figures (shared/bench/quaterion/results.jsonl), train-only epoch
    "w1_cached": dict(cache=2.9743, epoch=1.2907, fit=17.1948, p=(0.2425, 0.4125)),
    "w1_uncached": dict(cache=None, epoch=1.8627, fit=20.4725, p=(0.2425, 0.411)),
    "w2": dict(cache=3.7136, epoch=2.0536, fit=25.4261, p=(0.2425, 0.3775)),
    "w3": dict(cache=2.7872, epoch=3.9626, fit=43.0618, p=(0.2425, 0.413)),  # w3_..._start0
}
lines = [json.loads(l) for l in open(sys.argv[1]) if l.startswith("{")]
runs = {}
for l in lines:
    if "run" in l:
        runs.setdefault(l["workload"], []).append(l)
mm = next(l for l in lines if l.get("measurement") == "matmul_f32")
print(f"matmul 2048^3: {mm['gflops']} GFLOP/s (median of {mm['runs']}), other procs {mm['machine_load']['other_procs_cpu_frac']:.0%}")
print("| workload | figure | ours (median of 3) | floor | ratio | Quaterion | Quaterion / ours |")
print("|---|---|---|---|---|---|---|")
for l in lines:
    if l.get("measurement") != "summary":
        continue
    w, m = l["workload"], l["median"]
    q = Q[w]
    for key, fig, qk in [("cache_fill_s", "cache fill s", "cache"),
                         ("mean_epoch_train_only_after_first_s", "epoch s (train only, after 1st)", "epoch"),
                         ("fit_wall_s", "fit wall s", "fit")]:
        fk = {"cache_fill_s": "cache_fill", "mean_epoch_train_only_after_first_s": "epoch", "fit_wall_s": "fit"}[key]
        ours = m[key]
        qv = q[qk]
        if w == "w1_uncached" and fk == "cache_fill":
            continue
        sp = f"{qv / ours:.2f}x" if qv else "-"
        print(f"| {w} | {fig} | {ours:.3f} | {l['floor_s'][fk]:.3f} | {l['ratio'][fk]} | {qv if qv else '-'} | {sp} |")
    r = runs[w]
    qb = r[0]["q_before"]; qa = r[0]["q_after"]
    pk = "val_group_precision_at_1" if w == "w2" else "val_precision_at_1"
    print(f"| {w} | validation pass s | {m['validation_pass_s']:.3f} | | | | |")
    print(f"| {w} | peak RSS MB | {m['peak_rss_mb']:.0f} | | | not recorded | |")
    print(f"| {w} | P@1 before -> after | {qb[pk]} -> {qa[pk]} | | | {q['p'][0]} -> {q['p'][1]} | |")
    print(f"| {w} | other processes' CPU | {m['other_procs_cpu_frac']:.0%} | | | 0.8-1.6% | |")
for w, rs in runs.items():
    print(w, "per-run epoch s:", [r["mean_epoch_train_only_after_first_s"] for r in rs],
          "fit s:", [r["fit_wall_s"] for r in rs], "other:", [r["machine_load"]["other_procs_cpu_frac"] for r in rs])
W4Q = {"TripletLoss_hard": 37.1252, "TripletLoss_all": 36589.8347, "ContrastiveLoss": 34.9942,
       "OnlineContrastiveLoss_hard": 31.8522, "OnlineContrastiveLoss_all": 32.3155,
       "MultipleNegativesRankingLoss": 9.8365, "ArcFaceLoss": 9.4211, "CircleLoss": 50.5583,
       "SoftmaxLoss": 3.5666, "FastAPLoss": 503.3236, "TripletLoss_semi_hard_b128": 70.8829}
print("| loss | batch | ours median ms | min ms | iters (warm-up) | Quaterion median ms | Quaterion / ours | other procs |")
print("|---|---|---|---|---|---|---|---|")
for l in lines:
    if l.get("measurement") != "w4_loss":
        continue
    q = W4Q.get(l["loss"])
    sp = "%.2fx" % (q / l["median_ms"]) if q else "-"
    print(f"| {l['loss']} | {l['batch']} | {l['median_ms']:.2f} | {l['min_ms']:.2f} | {l['iters']} ({l['warmup']}) | "
          f"{q if q else '-'} | {sp} | {l['machine_load']['other_procs_cpu_frac']:.0%} |")
