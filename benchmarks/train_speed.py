#!/usr/bin/env python3
"""Training throughput: DynamicBatchSampler vs fixed-size sorted batches vs random batches, same manifest.

    python benchmarks/train_speed.py --data_folder MANIFESTS [--steps 40] [--seconds S] [--repeats 3]

For each batching strategy: audio seconds processed per second (forward + backward + optimizer step of the
recipe's model from hparams/phoneme.yaml, CTC loss), the padding ratio (padded samples / all samples) and the
time spent waiting on the data loader. The strategies see the same utterances with the same audio per batch on
average (the sampler's batches at ``--seconds``, default the recipe's ``max_batch_length``, and its
``num_buckets``; the peers take the sampler's mean batch size). One untimed warm-up pass first, then ``--repeats``
rounds that run the strategies in turn
(shared machines drift); each figure is the median over the rounds, the ratio is against random batches.
"""
from __future__ import annotations

import argparse
import csv
import random
import statistics
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


def run_batches(loader, modules, hp, opt) -> dict:
    """One pass over the batches: audio seconds, real / padded samples, loader wait and compute seconds."""
    out = dict(audio=0.0, real=0, padded=0, wait=0.0, compute=0.0)
    sr = int(hp["sample_rate"])
    t = time.time()
    for wavs, lens, n_real in loader:
        t1 = time.time()
        out["wait"] += t1 - t
        feats = compute_feats(modules, hp, wavs, lens)
        loss = ctc_log_probs(modules, hp, encode(modules, feats, lens)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        t = time.time()
        out["compute"] += t - t1
        out["audio"] += n_real / sr
        out["real"] += n_real
        out["padded"] += wavs.numel()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data_folder", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--seconds", type=float, help="audio seconds per batch (default: the recipe's max_batch_length)")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    with open(ROOT / "hparams/phoneme.yaml", encoding="utf-8") as fh:
        hp = load_hyperpyyaml(fh, {"data_folder": str(a.data_folder), "output_folder": "/tmp/train_speed"})
    seconds = a.seconds or float(hp["max_batch_length"])
    rows = list(csv.DictReader(open(a.data_folder / "train.csv", encoding="utf-8")))
    durs = [float(r["duration"]) for r in rows]
    ds = AudioDataset([r["wav"] for r in rows], int(hp["sample_rate"]))
    dyn = DynamicBatchSampler(ds, max_batch_length=seconds, num_buckets=int(hp["num_buckets"]),
                              length_func=lambda i: durs[i], shuffle=True, batch_ordering="random", lengths_list=durs)
    dyn_batches = list(dyn)
    # the peers get the sampler's mean batch size, so every strategy carries the same audio per batch on average
    mean_bs = max(1, round(sum(len(b) for b in dyn_batches) / len(dyn_batches)))
    order = sorted(range(len(rows)), key=lambda i: durs[i])
    rng = random.Random(0)
    sorted_batches = [order[i : i + mean_bs] for i in range(0, len(order), mean_bs)]
    rng.shuffle(sorted_batches)
    rand = list(range(len(rows)))
    rng.shuffle(rand)
    random_batches = [rand[i : i + mean_bs] for i in range(0, len(rand), mean_bs)]
    strategies = {"DynamicBatchSampler": dyn_batches, "fixed-size sorted": sorted_batches, "random": random_batches}
    modules = torch.nn.ModuleDict(dict(hp["modules"])).train()
    opt = torch.optim.Adam(modules.parameters(), lr=1e-3)

    def loader(batches):
        return torch.utils.data.DataLoader(ds, batch_sampler=batches[: a.steps], collate_fn=collate,
                                           num_workers=a.workers)

    for batches in strategies.values():  # warm-up: allocator, oneDNN kernels for these shapes, page cache
        run_batches(loader(batches[: max(2, a.steps // 4)]), modules, hp, opt)
    runs = {name: [] for name in strategies}
    for _ in range(a.repeats):
        for name, batches in strategies.items():
            runs[name].append(run_batches(loader(batches), modules, hp, opt))
    print(f"{a.threads} threads, {a.workers} loader worker(s), batches of <= {seconds:g} s padded audio (peers: "
          f"{mean_bs} utterances), {a.steps} steps, median of {a.repeats} rounds")
    print(f"{'batching':<22}{'batches':>8}{'audio s/s':>11}{'padding':>9}{'loader wait':>13}{'vs random':>11}")
    rate = {n: statistics.median(r["audio"] / (r["wait"] + r["compute"]) for r in rs) for n, rs in runs.items()}
    for name, rs in runs.items():
        r = rs[0]
        wait = statistics.median(x["wait"] / (x["wait"] + x["compute"]) for x in rs)
        print(f"{name:<22}{len(strategies[name][: a.steps]):>8}{rate[name]:>11.1f}{1 - r['real'] / r['padded']:>9.1%}"
              f"{wait:>13.1%}{rate[name] / rate['random']:>10.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
