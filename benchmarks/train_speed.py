#!/usr/bin/env python3
"""Training throughput: DynamicBatchSampler vs fixed-size sorted batches vs random batches, same manifest.

    python benchmarks/train_speed.py --data_folder MANIFESTS [--steps 40] [--seconds 12] [--threads 1]

For each batching strategy: audio seconds processed per second (forward + backward + optimizer step of the
recipe's model from hparams/phoneme.yaml), the padding ratio (padded samples / all samples) and the time spent
waiting on the data loader. The strategies see the same utterances with the same audio per batch on average.
"""
from __future__ import annotations

import argparse
import csv
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from hyperpyyaml import load_hyperpyyaml  # noqa: E402
from speechbrain.dataio.sampler import DynamicBatchSampler  # noqa: E402

from common.audio import AudioDataset  # noqa: E402
from common.model import batch_wavs, compute_feats, ctc_log_probs, encode  # noqa: E402


def collate(batch):
    wavs = [b[1] for b in batch]
    return *batch_wavs(wavs), sum(w.shape[0] for w in wavs)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data_folder", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--seconds", type=float, default=12.0, help="audio seconds per dynamic batch")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--workers", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    with open(ROOT / "hparams/phoneme.yaml", encoding="utf-8") as fh:
        hp = load_hyperpyyaml(fh, {"data_folder": str(a.data_folder), "output_folder": "/tmp/train_speed"})
    rows = list(csv.DictReader(open(a.data_folder / "train.csv", encoding="utf-8")))
    durs = [float(r["duration"]) for r in rows]
    mean_bs = max(1, round(a.seconds / (sum(durs) / len(durs))))
    ds = AudioDataset([r["wav"] for r in rows], int(hp["sample_rate"]))
    order = sorted(range(len(rows)), key=lambda i: durs[i])
    rng = random.Random(0)
    sorted_batches = [order[i : i + mean_bs] for i in range(0, len(order), mean_bs)]
    rng.shuffle(sorted_batches)
    rand = list(range(len(rows)))
    rng.shuffle(rand)
    random_batches = [rand[i : i + mean_bs] for i in range(0, len(rand), mean_bs)]
    dyn = DynamicBatchSampler(ds, max_batch_length=a.seconds, num_buckets=20, length_func=lambda i: durs[i],
                              shuffle=True, batch_ordering="random", lengths_list=durs)
    strategies = {"DynamicBatchSampler": list(dyn), "fixed-size sorted": sorted_batches, "random": random_batches}
    modules = torch.nn.ModuleDict(dict(hp["modules"]))
    opt = torch.optim.Adam(modules.parameters(), lr=1e-3)
    sr = int(hp["sample_rate"])
    print(f"{'batching':<22}{'batches':>8}{'audio s/s':>11}{'padding':>9}{'loader wait s':>15}{'compute s':>11}")
    base = None
    for name, batches in strategies.items():
        loader = torch.utils.data.DataLoader(ds, batch_sampler=batches[: a.steps], collate_fn=collate,
                                             num_workers=a.workers)
        audio = padded = real = 0.0
        wait = compute = 0.0
        t = time.time()
        for wavs, lens, n_real in loader:
            t1 = time.time()
            wait += t1 - t
            feats = compute_feats(modules, hp, wavs, lens)
            loss = ctc_log_probs(modules, hp, encode(modules, feats, lens)).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            t = time.time()
            compute += t - t1
            audio += n_real / sr
            real += n_real
            padded += wavs.numel()
        rate = audio / (wait + compute)
        base = base or rate
        print(f"{name:<22}{len(batches[: a.steps]):>8}{rate:>11.1f}{1 - real / padded:>9.1%}{wait:>15.2f}"
              f"{compute:>11.2f}   ({rate / base:.2f}x DynamicBatchSampler)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
