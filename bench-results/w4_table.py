"""The W4 side-by-side table from one run of scripts/w4_side_by_side.sh TAG.

    python3 bench-results/w4_table.py TAG

Reads w4_ours_TAG.jsonl and w4_torch_TAG.jsonl; per loss, the median over the rounds of
each round's median time (ms), the ratio torch / ours, and the load averages seen. The last
column is the ratio of the fastest single calls (the minimum over all rounds on each side):
on a shared machine a timing that another process interrupted adds the same milliseconds to
both sides, which pulls the ratio of medians towards 1; the minimum is the least disturbed
call of each side. The ratio of medians is the figure the tables quote.
"""
import json
import os
import statistics
import sys

TAG = sys.argv[1]
HERE = os.path.dirname(os.path.abspath(__file__))


def lines(side):
    with open(os.path.join(HERE, f"w4_{side}_{TAG}.jsonl")) as f:
        return [json.loads(l) for l in f if l.startswith("{")]


def by_loss(rows):
    out = {}
    for r in rows:
        out.setdefault(r["loss"], []).append(r)
    return out


ours, torch = by_loss(lines("ours")), by_loss(lines("torch"))
loads = [float(r["machine_load"]["loadavg_before"].split()[0]) for rs in ours.values() for r in rs]
loads += [float(r["loadavg_before"].split()[0]) for rs in torch.values() for r in rs]
print(f"rounds: {max(r['round'] for rs in ours.values() for r in rs)}; "
      f"1-minute load average at the start of a timing: {min(loads):.2f} to {max(loads):.2f}\n")
print("| loss | batch | ours ms | PyTorch ms | PyTorch impl | PyTorch / ours | ratio of minima |")
print("|---|---|---|---|---|---|---|")
for name, rs in ours.items():
    o = statistics.median(r["median_ms"] for r in rs)
    t = torch.get(name)
    if not t:
        print(f"| {name} | {rs[0]['batch']} | {o:.3f} | - | - | - | - |")
        continue
    tv = statistics.median(r["median_ms"] for r in t)
    ratio = tv / o
    mins = min(r["min_ms"] for r in t) / min(r["min_ms"] for r in rs)
    mark = "" if ratio >= 1.5 else " **below 1.5**"
    print(f"| {name} | {rs[0]['batch']} | {o:.3f} | {tv:.3f} | {t[0]['impl']} | {ratio:.2f}x{mark} "
          f"| {mins:.2f}x |")
