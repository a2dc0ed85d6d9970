#!/usr/bin/env python
"""The FAQ task with sentence-transformers and PyTorch, for the GPU side-by-side figures.

The same recipe as `bench -- --faq DIR` (and Quaterion's NLP tutorial): all-MiniLM-L6-v2
frozen (Transformer + mean pooling, no normalisation, as the tutorial's encoder), every
distinct text encoded once and the embeddings kept on the device; a SkipConnectionHead
(one gated residual block, gates initialised at -4); symmetric
MultipleNegativesRankingLoss with scale 20 on cosine similarities; Adam lr 1e-4, batch
1024 shuffled every epoch; validation (loss, precision@1 and MRR over the full validation
set, each question ranked against every validation answer) after every epoch.

Prints one JSON line with the same fields as the bench's `faq` line: cache fill seconds and
texts per second, mean epoch seconds, fit and total wall time, quality before and after.

    python3 scripts/st_faq.py --model target/models/all-MiniLM-L6-v2 --device cuda
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import time


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="sentence-transformers directory of all-MiniLM-L6-v2")
    p.add_argument("--data", default=os.path.join(os.path.dirname(__file__), "..", "data", "cloud-faq"))
    p.add_argument("--device", default="cuda")
    p.add_argument("--epochs", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--limit", type=int, default=None, help="first N pairs of each split (smoke test)")
    return p.parse_args()


ARGS = parse_args()

import torch  # noqa: E402
from sentence_transformers import SentenceTransformer  # noqa: E402


def read_split(split):
    path = os.path.join(ARGS.data, f"{split}_cloud_faq_dataset.jsonl.gz")
    with gzip.open(path, "rt") as f:
        rows = [json.loads(line) for line in f]
    if ARGS.limit:
        rows = rows[: ARGS.limit]
    return [(r["question"], r["answer"]) for r in rows]


class SkipConnectionHead(torch.nn.Module):
    """x + fc(x) * sigmoid(gates), Quaterion's SkipConnectionHead with one layer."""

    def __init__(self, d):
        super().__init__()
        self.fc = torch.nn.Linear(d, d)
        self.gates = torch.nn.Parameter(torch.full((d,), -4.0))

    def forward(self, x):
        return self.fc(x) * torch.sigmoid(self.gates) + x


def mnrl(q, a, scale=20.0):
    logits = scale * torch.nn.functional.normalize(q, dim=1) @ torch.nn.functional.normalize(a, dim=1).T
    labels = torch.arange(q.shape[0], device=q.device)
    ce = torch.nn.functional.cross_entropy
    return (ce(logits, labels) + ce(logits.T, labels)) / 2


@torch.no_grad()
def evaluate(head, q, a):
    hq, ha = head(q), head(a)
    sims = torch.nn.functional.normalize(hq, dim=1) @ torch.nn.functional.normalize(ha, dim=1).T
    own = sims.diagonal().unsqueeze(1)
    rank = (sims > own).sum(dim=1)  # 0-based rank of the question's own answer
    loss = sum(
        mnrl(hq[i : i + 1024], ha[i : i + 1024]).item() for i in range(0, q.shape[0], 1024)
    ) / len(range(0, q.shape[0], 1024))
    return {
        "precision_at_1": round((rank == 0).float().mean().item(), 4),
        "mrr": round((1.0 / (rank + 1).float()).mean().item(), 4),
        "val_loss": round(loss, 6),
    }


def sync():
    if ARGS.device.startswith("cuda"):
        torch.cuda.synchronize()


def main():
    torch.manual_seed(ARGS.seed)
    started = time.perf_counter()
    full = SentenceTransformer(ARGS.model, device=ARGS.device)
    # The tutorial's encoder: Transformer + mean pooling, without the Normalize module.
    encoder = SentenceTransformer(modules=[full[0], full[1]], device=ARGS.device)
    encoder.eval()
    train, val = read_split("train"), read_split("val")
    texts = sorted({t for pairs in (train, val) for pair in pairs for t in pair})
    sync()
    t0 = time.perf_counter()
    emb = encoder.encode(texts, batch_size=256, convert_to_tensor=True, normalize_embeddings=False)
    sync()
    fill_s = time.perf_counter() - t0
    row = {t: i for i, t in enumerate(texts)}
    idx = lambda pairs, k: torch.tensor([row[p[k]] for p in pairs], device=emb.device)  # noqa: E731
    tq, ta, vq, va = (emb[idx(train, 0)], emb[idx(train, 1)], emb[idx(val, 0)], emb[idx(val, 1)])
    head = SkipConnectionHead(emb.shape[1]).to(emb.device)
    opt = torch.optim.Adam(head.parameters(), lr=1e-4)
    before = evaluate(head, vq, va)
    epochs = []
    t_fit = time.perf_counter()
    for _ in range(ARGS.epochs):
        t_epoch = time.perf_counter()
        head.train()
        order = torch.randperm(tq.shape[0], device=emb.device)
        for i in range(0, tq.shape[0], 1024):
            b = order[i : i + 1024]
            loss = mnrl(head(tq[b]), head(ta[b]))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        head.eval()
        evaluate(head, vq, va)
        sync()
        epochs.append(time.perf_counter() - t_epoch)
    fit_s = time.perf_counter() - t_fit
    after = evaluate(head, vq, va)
    tail = epochs[1:] or epochs
    print(json.dumps({
        "workload": "faq_sentence_transformers",
        "device": ARGS.device,
        "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name() if ARGS.device.startswith("cuda") else None,
        "train_pairs": len(train),
        "val_pairs": len(val),
        "distinct_texts": len(texts),
        "cache_fill_s": round(fill_s, 3),
        "fill_texts_per_s": round(len(texts) / fill_s, 1),
        "mean_epoch_s": round(sum(tail) / len(tail), 4),
        "fit_wall_s": round(fit_s, 3),
        "total_s": round(time.perf_counter() - started, 3),
        "epochs": ARGS.epochs,
        "q_before": before,
        "q_after": after,
    }))


if __name__ == "__main__":
    main()
