"""A boundary detector trained on the corpus' own fused boundaries: one more member of the refinement's fusion.

The refinement's members (the frame classifier, the HMM-GMM ensembles) each model phones: 300 phones of a
many-language corpus leave each with a few examples, and where the members disagree by 40 ms or more (a quarter
of VoxAngeles' phone|phone boundaries) the fused boundary is right within 20 ms only ~65 % of the time. This model
does not tell phones apart: it scores, frame by frame, "the change from a phone of manner class A to one of class B
is here" (``common.phonology.context_class``: vowel, stop, fricative, nasal, approximant, silence), so every
boundary of the corpus trains the same few parameters.

1. Targets: the members' fused boundaries (no labels are needed: the detector learns the acoustic pattern of the
   boundaries the ensemble places, pooled over all phones, and applies it evenly where the members disagree);
   hand-checked rows (``--labelled``) give their own. A few epochs (3): a network trained on noisy targets learns
   what they share before it learns each one's own error (on VoxAngeles 3 epochs beat 2, 4 and 10; on the tone
   corpus of the tests 3 epochs take targets 11.9 ms off to 2.1 ms, 10 epochs of a wider model only to 8.1).
2. Model (:class:`BoundaryDetector`): 80 log-mel bands at 5 ms (the classifier's features) -> three dilated
   convolutions (~145 ms receptive field) -> plus an embedding of the (left, right) manner classes -> one score per
   frame. Trained with a softmax over the frames of a window around each target (+-``window_ms``, the target at a
   random place in it): which of these frames is the boundary.
3. Each boundary of each row: the frame of highest score between the members' earliest proposal minus
   ``search_ms`` and their latest plus ``search_ms``; these end times join the fusion as a member of weight
   ``weight``.

Measured on VoxAngeles (the development languages, one trained recognizer): see README "Real human speech".
"""
from __future__ import annotations

import random
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from common.audio import length_buckets
from common.ddp import SINGLE, Shard
from common.refine import _autocast, _pad

DETECTOR_PRECISIONS = ("fp32", "bf16")


@dataclass
class DetectorConfig:
    """The boundary detector's knobs (``hparams/export.yaml``: ``detector_*``). ``weight`` 0 turns it off."""
    weight: float = 2.0 / 3.0  # its weight in the fusion (the classifier has 1 - hmm_weight, the HMM-GMMs hmm_weight)
    epochs: int = 3  # few: it learns what the boundaries share before it could learn each one's own error
    channels: int = 64
    lr: float = 0.002
    window_ms: float = 80.0  # training: a softmax over +-this around each target
    search_ms: float = 30.0  # alignment: the argmax between the members' earliest - this and latest + this
    batch_seconds: float = 10.0  # audio seconds per training batch
    seed: int = 0
    precision: str = "fp32"  # bf16: autocast (the export sets it from --precision, as the classifier's)

    def check(self) -> None:
        if self.weight < 0:
            raise ValueError(f"detector weight must be >= 0, got {self.weight}")
        if self.weight > 0:
            bad = [f"{k} must be > 0, got {v}" for k, v in (("epochs", self.epochs), ("channels", self.channels),
                                                            ("lr", self.lr), ("window_ms", self.window_ms),
                                                            ("batch_seconds", self.batch_seconds)) if v <= 0]
            if self.search_ms < 0:
                bad.append(f"search_ms must be >= 0, got {self.search_ms}")
            if self.precision not in DETECTOR_PRECISIONS:
                bad.append(f"precision must be {' or '.join(DETECTOR_PRECISIONS)}, got {self.precision!r}")
            if bad:
                raise ValueError("boundary detector: " + "; ".join(bad))


class BoundaryDetector(nn.Module):
    """log-mel frames [B, T, n_mels] -> a shared trunk [B, C, T]; ``scores`` adds a (left, right) manner-class
    embedding and gives one score per frame for each boundary asked about."""

    def __init__(self, n_classes: int, n_mels: int = 80, channels: int = 64):
        super().__init__()
        self.n_classes = n_classes
        layers, c_in = [], n_mels
        for d in (1, 2, 4):
            layers += [nn.Conv1d(c_in, channels, 5, padding=2 * d, dilation=d), nn.ReLU(), nn.BatchNorm1d(channels)]
            c_in = channels
        self.trunk = nn.Sequential(*layers)
        self.pair = nn.Embedding(n_classes * n_classes, channels)
        self.head = nn.Sequential(nn.Conv1d(channels, channels, 3, padding=1), nn.ReLU(), nn.Conv1d(channels, 1, 1))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.trunk(x.transpose(1, 2))

    def scores(self, h: torch.Tensor, pairs: torch.Tensor) -> torch.Tensor:
        """h [N, C, L] (each boundary's stretch of trunk frames), pairs [N] -> [N, L]."""
        return self.head(h + self.pair(pairs)[:, :, None])[:, 0]

    def window_scores(self, h: torch.Tensor) -> torch.Tensor:
        """``scores`` of frames 1 .. L-2 of ``h`` [N, C, L] (each a window of a row's trunk frames plus its pair
        embedding, with one frame of context on each side, zeros beyond the row's edges where ``scores`` pads)
        -> [N, L - 2]: the head's 3-frame convolution without padding."""
        conv, _, out = self.head
        x = torch.relu(nn.functional.conv1d(h, conv.weight, conv.bias))
        return out(x)[:, 0]


def _pairs(classes: np.ndarray, n_classes: int) -> np.ndarray:
    """Per boundary k (between unit k and k + 1): left class * n_classes + right class."""
    return classes[:-1] * n_classes + classes[1:]


def train_detector(feats: list[torch.Tensor], classes: list[np.ndarray], targets_s: list[np.ndarray | None],
                   n_classes: int, hop_s: float, cfg: DetectorConfig, device: str = "cpu", log=None
                   ) -> tuple[BoundaryDetector, list[float]]:
    """Train on every inner boundary of every row with a target (``targets_s[i]``: its units' end times, the last
    the audio's end; None: the row is left out). ``classes[i]``: each unit's manner class. Returns (the model in
    eval mode, the mean loss of each epoch)."""
    rng = random.Random(cfg.seed)
    torch.manual_seed(cfg.seed)
    half = max(1, int(round(cfg.window_ms / 1000.0 / hop_s)))
    width = 2 * half + 1
    rows = [i for i, t in enumerate(targets_s) if t is not None and len(t) > 1]
    model = BoundaryDetector(n_classes, feats[0].shape[1], cfg.channels).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    batches = length_buckets([feats[i].shape[0] for i in rows], max(1, int(cfg.batch_seconds / hop_s)))
    batches = [[rows[j] for j in b] for b in batches]
    model.train()
    losses = []
    for ep in range(cfg.epochs):
        rng.shuffle(batches)
        tot, n, t0 = 0.0, 0, time.time()
        for idx in batches:
            b_of, lo_of, tgt, pairs = [], [], [], []
            for b, i in enumerate(idx):
                T = feats[i].shape[0]
                j = np.clip(np.round(np.asarray(targets_s[i][:-1]) / hop_s).astype(np.int64), 0, T - 1)
                off = np.array([rng.randint(-half // 2, half // 2) for _ in j], dtype=np.int64)
                b_of.append(np.full(len(j), b))
                lo_of.append(j + off - half)
                tgt.append(half - off)
                pairs.append(_pairs(classes[i], n_classes))
            b_of, lo_of = np.concatenate(b_of), np.concatenate(lo_of)
            tgt, pairs = torch.from_numpy(np.concatenate(tgt)), torch.from_numpy(np.concatenate(pairs))
            x, lens = _pad([feats[i] for i in idx], device)
            pos = torch.from_numpy(lo_of)[:, None] + torch.arange(width)[None]  # [N, width] frame indices
            valid = (pos >= 0) & (pos < lens[torch.from_numpy(b_of)][:, None])
            with _autocast(device, cfg):
                h = model.features(x)  # [B, C, T]
                hp = nn.functional.pad(h, (width, width))  # any window position is inside the padded trunk
                win = hp[torch.from_numpy(b_of)[:, None], :, pos + width]  # [N, width, C]
                s = model.scores(win.transpose(1, 2), pairs.to(device)).float()
            s = s.masked_fill(~valid.to(device), -1e4)
            loss = nn.functional.cross_entropy(s, tgt.to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 5.0)
            opt.step()
            tot, n = tot + float(loss.detach()), n + 1
        losses.append(tot / max(n, 1))
        if log:
            log(f"boundary detector epoch {ep + 1}/{cfg.epochs}: loss {losses[-1]:.3f} ({time.time() - t0:.1f} s)")
    model.eval()
    return model, losses


@torch.no_grad()
def detect(model: BoundaryDetector, feats: list[torch.Tensor], classes: list[np.ndarray],
           proposals: list[list[np.ndarray | None]], durations: list[float], hop_s: float, cfg: DetectorConfig,
           device: str = "cpu", shard: Shard = SINGLE) -> list[np.ndarray | None]:
    """Per row, each unit's end time: for every inner boundary the highest-scoring frame between the earliest of
    the ``proposals`` (members' end times for that row; None where a member has none) minus ``cfg.search_ms`` and
    the latest plus it; the last unit ends with the audio. None for a row no member proposed anything for."""
    search = cfg.search_ms / 1000.0
    out: dict[int, np.ndarray | None] = {}
    for idx in shard.take(length_buckets([f.shape[0] for f in feats], max(1, int(4 * cfg.batch_seconds / hop_s)))):
        with _autocast(device, cfg):
            h = model.features(_pad([feats[i] for i in idx], device)[0])
        rows, b_of, lo_all, hi_all, pairs = [], [], [], [], []
        for b, i in enumerate(idx):
            have = [p[i] for p in proposals if p[i] is not None]
            if not have or len(have[0]) < 2:
                out[i] = None if not have else np.asarray(have[0], dtype=np.float64)
                continue
            P = np.stack([np.asarray(e, dtype=np.float64) for e in have])[:, :-1]  # [members, boundaries]
            T = feats[i].shape[0]
            # the frames from the earliest proposal - search to the latest + search (at least one frame)
            lo_all.append(np.clip(np.floor((P.min(0) - search) / hop_s), 0, T - 1).astype(np.int64))
            hi_all.append(np.clip(np.ceil((P.max(0) + search) / hop_s), 0, T - 1).astype(np.int64))
            rows.append((i, len(lo_all[-1])))
            b_of.append(np.full(len(lo_all[-1]), b))
            pairs.append(_pairs(classes[i], model.n_classes))
        if not rows:
            continue
        lo, hi = torch.from_numpy(np.concatenate(lo_all)), torch.from_numpy(np.concatenate(hi_all))
        b_of = torch.from_numpy(np.concatenate(b_of))
        T_of = torch.tensor([feats[i].shape[0] for i in idx])[b_of]
        # each boundary's window of trunk frames (and one more on each side: the head's context; zeros beyond
        # the row, as the head's padding), scored there only
        pos = lo[:, None] - 1 + torch.arange(int((hi - lo).max()) + 3)[None]  # [N, W + 2]
        inside = (pos >= 0) & (pos < T_of[:, None])
        with _autocast(device, cfg):
            win = h[b_of[:, None], :, pos.clamp(0, h.shape[2] - 1)].transpose(1, 2)  # [N, C, W + 2]
            win = (win + model.pair(torch.from_numpy(np.concatenate(pairs)).to(device))[:, :, None]) \
                * inside[:, None, :].to(device)
            s = model.window_scores(win).float().cpu()  # [N, W]: frame lo + j
        s = s.masked_fill(lo[:, None] + torch.arange(s.shape[1])[None] > hi[:, None], -float("inf"))
        frame = (lo + s.argmax(1)).numpy()
        k = 0
        for i, n in rows:
            ends = np.append(frame[k: k + n] * hop_s, durations[i])
            out[i] = np.maximum.accumulate(np.clip(ends, 0.0, durations[i]))
            k += n
    out = shard.gather(out)
    return [out[i] for i in range(len(feats))]
