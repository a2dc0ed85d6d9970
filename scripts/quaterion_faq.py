#!/usr/bin/env python
"""The FAQ benchmark run by the real Quaterion, for side-by-side figures in BENCHMARKS.md.

Quaterion's NLP tutorial recipe on data/cloud-faq: all-MiniLM-L6-v2 frozen and cached
(CacheType.AUTO, cache batch 256), SkipConnectionHead, MultipleNegativesRankingLoss
(symmetric), Adam lr 1e-4, batch 1024, validation every epoch, 2 torch threads. The
encoder is the tutorial's Transformer + mean Pooling, written with `transformers`
(AutoModel + AutoTokenizer, padding to the longest text of each batch, max 256 tokens),
which is what sentence-transformers runs.

With `--tutorial-metrics` the model also attaches the tutorial's batch-wise metrics, as its
`configure_metrics` does: `AttachedMetric("RetrievalPrecision", RetrievalPrecision(k=1))`
and `AttachedMetric("RetrievalReciprocalRank", RetrievalReciprocalRank())`, both
`prog_bar=True, on_epoch=True`, computed on every training and validation batch. That is
the tutorial as written; without the flag the fit does the same training with the loss only
(what our trainer does when no metric is attached), and the JSON line says which
(`tutorial_metrics`). The attached metrics' last epoch values are in `attached_metrics`.

Prints one JSON line: cache fill, per-epoch times, fit wall time, peak RSS, and
precision@1 / MRR over the full validation set before and after the fit (each question
ranked by cosine distance against all validation answers; its own answer is the relevant
one), computed the same way as `cargo run --release --example bench -- --faq DIR`.

Environment: the Quaterion 0.1.35 stack of the benchmark baseline (quaterion,
quaterion-models, torch 2.0.1, pytorch-lightning 1.9.5) plus `transformers==4.30.2`:

    python3 -m venv venv && venv/bin/pip install "setuptools==69.5.1"
    venv/bin/pip install --ignore-requires-python quaterion==0.1.35 quaterion-models==0.1.19 \
        torch==2.0.1 pytorch-lightning==1.9.5 "numpy<2" transformers==4.30.2
    bash scripts/fetch-minilm.sh
    venv/bin/python scripts/quaterion_faq.py --model target/models/all-MiniLM-L6-v2 --epochs 500
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import resource
import time

ARGS = None


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="sentence-transformers directory of all-MiniLM-L6-v2")
    p.add_argument("--data", default=os.path.join(os.path.dirname(__file__), "..", "data", "cloud-faq"))
    p.add_argument("--epochs", type=int, default=500)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--limit", type=int, default=None, help="use the first N pairs of each split (smoke test)")
    p.add_argument("--tutorial-metrics", action="store_true",
                   help="attach the tutorial's RetrievalPrecision(k=1) and RetrievalReciprocalRank")
    return p.parse_args()


ARGS = parse_args()
os.environ.setdefault("OMP_NUM_THREADS", str(ARGS.threads))
os.environ.setdefault("MKL_NUM_THREADS", str(ARGS.threads))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytorch_lightning as pl  # noqa: E402
import torch  # noqa: E402
from quaterion import Quaterion, TrainableModel  # noqa: E402
from quaterion.dataset import PairsSimilarityDataLoader, SimilarityPairSample  # noqa: E402
from quaterion.eval.attached_metric import AttachedMetric  # noqa: E402
from quaterion.eval.pair import RetrievalPrecision, RetrievalReciprocalRank  # noqa: E402
from quaterion.loss import MultipleNegativesRankingLoss  # noqa: E402
from quaterion.train.cache import CacheConfig, CacheType  # noqa: E402
from quaterion_models.encoders import Encoder  # noqa: E402
from quaterion_models.heads import SkipConnectionHead  # noqa: E402
from torch.utils.data import Dataset  # noqa: E402
from transformers import AutoModel, AutoTokenizer  # noqa: E402

torch.set_num_threads(ARGS.threads)


def read_pairs(name):
    path = os.path.join(ARGS.data, f"{name}_cloud_faq_dataset.jsonl.gz")
    with gzip.open(path, "rt") as f:
        return [json.loads(line) for line in f]


class FAQDataset(Dataset):
    def __init__(self, rows):
        self.rows = rows

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        r = self.rows[i]
        return SimilarityPairSample(obj_a=r["question"], obj_b=r["answer"])


class FAQEncoder(Encoder):
    """Transformer + mean pooling (sentence-transformers' modules 0 and 1), frozen."""

    def __init__(self, path):
        super().__init__()
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.bert = AutoModel.from_pretrained(path)

    @property
    def trainable(self):
        return False

    @property
    def embedding_size(self):
        return self.bert.config.hidden_size

    def get_collate_fn(self):
        def collate(texts):
            return self.tokenizer(list(texts), padding=True, truncation="longest_first",
                                  max_length=256, return_tensors="pt")
        return collate

    def forward(self, batch):
        out = self.bert(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(out.dtype)
        return (out * mask).sum(1) / mask.sum(1).clamp(min=1e-9)

    def save(self, output_path):
        raise NotImplementedError

    @classmethod
    def load(cls, input_path):
        raise NotImplementedError


class FAQModel(TrainableModel):
    def __init__(self, path, lr=1e-4):
        self.path = path
        self.lr = lr
        super().__init__()

    def configure_encoders(self):
        return FAQEncoder(self.path)

    def configure_head(self, input_embedding_size):
        return SkipConnectionHead(input_embedding_size)

    def configure_loss(self):
        return MultipleNegativesRankingLoss(symmetric=True)

    def configure_optimizers(self):
        return torch.optim.Adam(self.model.parameters(), lr=self.lr)

    def configure_caches(self):
        return CacheConfig(CacheType.AUTO, batch_size=256)

    def configure_metrics(self):
        if not ARGS.tutorial_metrics:
            return []
        return [
            AttachedMetric("RetrievalPrecision", RetrievalPrecision(k=1), prog_bar=True, on_epoch=True),
            AttachedMetric("RetrievalReciprocalRank", RetrievalReciprocalRank(), prog_bar=True,
                           on_epoch=True),
        ]


class Timing(pl.Callback):
    def __init__(self):
        self.t = {}
        self.epochs = []
        self.val = []

    def on_predict_start(self, trainer, pl_module):
        self.t.setdefault("predict_start", time.perf_counter())

    def on_predict_end(self, trainer, pl_module):
        self.t["predict_end"] = time.perf_counter()

    def on_train_epoch_start(self, trainer, pl_module):
        self._e = time.perf_counter()
        self._v = 0.0

    def on_validation_epoch_start(self, trainer, pl_module):
        self._vs = time.perf_counter()

    def on_validation_epoch_end(self, trainer, pl_module):
        if hasattr(self, "_e"):
            self._v += time.perf_counter() - self._vs

    def on_train_epoch_end(self, trainer, pl_module):
        self.epochs.append(time.perf_counter() - self._e)
        self.val.append(self._v)


def full_set_scores(head, q_emb, a_emb):
    """Precision@1 and MRR: each question against all answers by cosine distance."""
    with torch.no_grad():
        q = torch.nn.functional.normalize(head(q_emb), dim=-1)
        a = torch.nn.functional.normalize(head(a_emb), dim=-1)
        sim = q @ a.T
        own = sim.diagonal().unsqueeze(1)
        rank = (sim > own).sum(1) + 1  # 1-based rank of the own answer (ties favour it)
        return float((rank == 1).float().mean()), float((1.0 / rank.float()).mean())


def main():
    pl.seed_everything(ARGS.seed, workers=True)
    train, val = read_pairs("train")[:ARGS.limit], read_pairs("val")[:ARGS.limit]
    model = FAQModel(ARGS.model)
    train_dl = PairsSimilarityDataLoader(FAQDataset(train), batch_size=1024, shuffle=True)
    val_dl = PairsSimilarityDataLoader(FAQDataset(val), batch_size=1024)

    # The frozen encoder's embeddings of the validation texts, for the full-set scores.
    enc = model.model.encoders[list(model.model.encoders.keys())[0]]
    collate = enc.get_collate_fn()

    def embed(texts):
        with torch.no_grad():
            return torch.cat([enc(collate(texts[i:i + 256])) for i in range(0, len(texts), 256)])

    t0 = time.perf_counter()
    q_emb = embed([r["question"] for r in val])
    a_emb = embed([r["answer"] for r in val])
    eval_embed_s = time.perf_counter() - t0
    head = model.model.head
    p1_before, mrr_before = full_set_scores(head, q_emb, a_emb)

    cb = Timing()
    trainer = pl.Trainer(max_epochs=ARGS.epochs, accelerator="cpu", logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, callbacks=[cb])
    t0 = time.perf_counter()
    Quaterion.fit(trainable_model=model, trainer=trainer, train_dataloader=train_dl, val_dataloader=val_dl)
    fit_s = time.perf_counter() - t0
    p1_after, mrr_after = full_set_scores(model.model.head, q_emb, a_emb)

    after_first = cb.epochs[1:] or cb.epochs
    val_after_first = cb.val[1:] or cb.val
    print(json.dumps({
        "workload": "faq_quaterion",
        "epochs": len(cb.epochs),
        "cache_fill_s": round(cb.t["predict_end"] - cb.t["predict_start"], 3),
        "mean_epoch_s": round(sum(after_first) / len(after_first), 4),
        "mean_epoch_val_s": round(sum(val_after_first) / len(val_after_first), 4),
        "fit_wall_s": round(fit_s, 3),
        "eval_embed_s": round(eval_embed_s, 3),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "p1_before": round(p1_before, 4), "mrr_before": round(mrr_before, 4),
        "p1_after": round(p1_after, 4), "mrr_after": round(mrr_after, 4),
        "tutorial_metrics": ARGS.tutorial_metrics,
        "attached_metrics": {k: round(float(v), 4) for k, v in trainer.callback_metrics.items()
                             if "Retrieval" in k},
        "seed": ARGS.seed,
        "torch": torch.__version__, "threads": torch.get_num_threads(),
    }), flush=True)


if __name__ == "__main__":
    main()
