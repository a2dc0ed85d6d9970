"""W4 on the PyTorch side: forward + backward of every loss the bench's W4 times, with the
PyTorch implementation of each, in the same convention as Quaterion's bench.py (a fresh
`requires_grad` copy of the embeddings per call, parameters' gradients cleared, the median
of --iters timings after --warmup calls, `torch.set_num_threads(--threads)`).

    QVENV/bin/python scripts/w4_torch.py [--only NAME,NAME] [--threads 2] >> RAW.jsonl

Which implementation (the `impl` field of each line):
* `quaterion`: Quaterion 0.1.35 where it has the loss (TripletLoss, ContrastiveLoss,
  OnlineContrastiveLoss, MultipleNegativesRankingLoss, ArcFaceLoss, SoftmaxLoss, CircleLoss
  (its pooled form), FastAPLoss), with its defaults, which ours share.
* `pml`: pytorch-metric-learning 2.9.0 otherwise (MultiSimilarityLoss with its
  MultiSimilarityMiner(epsilon=0.1), SupConLoss(temperature=0.1), CosFaceLoss(margin=0.35,
  scale=64), and CircleLoss(m=0.25, gamma=256), the per-anchor form), defaults matched to ours.
* `torch`: CenterLoss is in neither library; it is the loss module's formula written in
  torch (`lambda_c · mean((normalize(x) − C[g])²)`, Xavier-uniform centres).

Inputs are Quaterion's bench.py W4 inputs (N(0, 1) embeddings, 100 random groups; pair
losses see the rows as N/2 pairs), at the batch sizes ours uses: 1024, or 256 for
TripletLoss all (an (N, N, N) tensor) and 128 for semi-hard (Quaterion's own cap). Each line
records /proc/loadavg before and after.
"""
import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

P = argparse.ArgumentParser()
P.add_argument("--threads", type=int, default=2)
P.add_argument("--iters", type=int, default=50)
P.add_argument("--warmup", type=int, default=5)
P.add_argument("--seed", type=int, default=42)
P.add_argument("--only", default=None)
P.add_argument("--dim", type=int, default=384)
P.add_argument("--groups", type=int, default=100)
ARGS = P.parse_args()
torch.set_num_threads(ARGS.threads)

from quaterion.loss import (  # noqa: E402
    ArcFaceLoss, CircleLoss, ContrastiveLoss, FastAPLoss, MultipleNegativesRankingLoss,
    OnlineContrastiveLoss, SoftmaxLoss, TripletLoss)
import pytorch_metric_learning.losses as pml  # noqa: E402
import pytorch_metric_learning.miners as pml_miners  # noqa: E402


def loadavg():
    with open("/proc/loadavg") as f:
        return f.read().strip()


def inputs(b):
    g = torch.Generator().manual_seed(ARGS.seed)
    emb = torch.randn(b, ARGS.dim, generator=g)
    groups = torch.randint(0, ARGS.groups, (b,), generator=g)
    half = b // 2
    pairs = torch.LongTensor([[i, i + half] for i in range(half)])
    labels = (torch.rand(half, generator=g) < 0.5).float()
    sub = torch.randint(0, ARGS.groups, (half,), generator=g).float()
    return emb, groups, pairs, labels, torch.cat([sub, sub])


class Center(torch.nn.Module):
    def __init__(self, c, d, lambda_c=0.5):
        super().__init__()
        bound = (6.0 / (c + d)) ** 0.5
        self.centers = torch.nn.Parameter(torch.empty(c, d).uniform_(-bound, bound))
        self.lambda_c = lambda_c

    def forward(self, e, g):
        return self.lambda_c * (F.normalize(e, dim=1) - self.centers[g]).pow(2).mean()


def table_1024(emb, groups, pairs, labels, sub):
    d, c = ARGS.dim, ARGS.groups
    ones = torch.ones(emb.shape[0] // 2)

    def grp(loss):
        return lambda e: loss(embeddings=e, groups=groups)

    def pw(loss, lab):
        return lambda e: loss(embeddings=e, pairs=pairs, labels=lab, subgroups=sub)

    ms_loss = pml.MultiSimilarityLoss(alpha=2, beta=50, base=0.5)
    ms_miner = pml_miners.MultiSimilarityMiner(epsilon=0.1)
    supcon = pml.SupConLoss(temperature=0.1)
    cosface = pml.CosFaceLoss(num_classes=c, embedding_size=d, margin=0.35, scale=64)
    circle_pml = pml.CircleLoss(m=0.25, gamma=256)
    arcface = ArcFaceLoss(embedding_size=d, num_groups=c)
    softmax = SoftmaxLoss(embedding_size=d, num_groups=c)
    center = Center(c, d)
    triplet_hard = TripletLoss(margin=0.5, mining="hard")
    return {
        "TripletLoss_hard": ("quaterion", grp(triplet_hard), []),
        "ContrastiveLoss": ("quaterion", pw(ContrastiveLoss(), labels), []),
        "MultipleNegativesRankingLoss": ("quaterion", pw(MultipleNegativesRankingLoss(), ones), []),
        "OnlineContrastiveLoss_hard": ("quaterion", grp(OnlineContrastiveLoss(mining="hard")), []),
        "OnlineContrastiveLoss_all": ("quaterion", grp(OnlineContrastiveLoss(mining="all")), []),
        "ArcFaceLoss": ("quaterion", grp(arcface), list(arcface.parameters())),
        "SoftmaxLoss": ("quaterion", grp(softmax), list(softmax.parameters())),
        "CircleLoss": ("quaterion", grp(CircleLoss()), []),
        "FastAPLoss": ("quaterion", grp(FastAPLoss()), []),
        "CircleLoss_per_anchor": ("pml", lambda e: circle_pml(e, groups), []),
        "MultiSimilarityLoss": ("pml", lambda e: ms_loss(e, groups, ms_miner(e, groups)), []),
        "SupConLoss": ("pml", lambda e: supcon(e, groups), []),
        "CosFaceLoss": ("pml", lambda e: cosface(e, groups), list(cosface.parameters())),
        "CenterLoss": ("torch", lambda e: center(e, groups), list(center.parameters())),
        "CombinedLoss_TripletHard_Center": (
            "quaterion+torch",
            lambda e: triplet_hard(embeddings=e, groups=groups) + center(e, groups),
            list(center.parameters())),
    }


def cases():
    torch.manual_seed(ARGS.seed)
    out = {}
    for b in (1024, 256, 128):
        emb, groups, pairs, labels, sub = inputs(b)
        if b == 1024:
            table = table_1024(emb, groups, pairs, labels, sub)
        elif b == 256:
            loss = TripletLoss(margin=0.5, mining="all")
            table = {"TripletLoss_all_b256": (
                "quaterion", lambda e, loss=loss, g=groups: loss(embeddings=e, groups=g), [])}
        else:
            loss = TripletLoss(margin=0.5, mining="semi_hard")
            table = {"TripletLoss_semi_hard_b128": (
                "quaterion", lambda e, loss=loss, g=groups: loss(embeddings=e, groups=g), [])}
        for name, (impl, fn, params) in table.items():
            out[name] = (impl, fn, params, emb)
    return out


def time_case(fn, emb, params):
    def one():
        e = emb.clone().requires_grad_(True)
        for p in params:
            p.grad = None
        t = time.perf_counter()
        loss = fn(e)
        loss.backward()
        return time.perf_counter() - t, float(loss)

    first, value = one()
    warmup, iters = ARGS.warmup, ARGS.iters
    if first * (warmup + iters) > 90:
        warmup, iters = 1, 3
    for _ in range(max(0, warmup - 1)):
        one()
    times = [one()[0] for _ in range(iters)]
    return {"median_ms": round(1000 * statistics.median(times), 4),
            "min_ms": round(1000 * min(times), 4), "iters": iters, "warmup": warmup,
            "first_call_ms": round(1000 * first, 3), "loss_value": value}


def main():
    only = set(ARGS.only.split(",")) if ARGS.only else None
    for name, (impl, fn, params, emb) in cases().items():
        if only and name not in only:
            continue
        before = loadavg()
        r = time_case(fn, emb, params)
        print(json.dumps({"measurement": "w4_loss_torch", "loss": name, "impl": impl,
                          "batch": emb.shape[0], "threads": ARGS.threads, **r,
                          "loadavg_before": before, "loadavg_after": loadavg(),
                          "torch": torch.__version__}), flush=True)


if __name__ == "__main__":
    main()
