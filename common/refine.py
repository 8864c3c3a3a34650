"""Boundary refinement by Viterbi re-training, as HMM aligners iterate.

The recognizer's CTC posteriors place phones well but their boundaries loosely (CTC is peaky: most frames are
blank). Refinement trains a small frame classifier with a *local* receptive field (a few frames of fbank) on the
first-pass alignment of the corpus being aligned, re-aligns with MAS over its log-posteriors, and repeats. A
local classifier cannot learn the first pass's offsets, only what each phone sounds like, so each round moves
boundaries towards the acoustic changes. Classes are the model's tokens; edge-silence slots use class 0.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from common.mas import maximum_path


class FrameClassifier(nn.Module):
    def __init__(self, n_feats: int, n_classes: int, channels: int = 256, kernel: int = 3, layers: int = 2):
        super().__init__()
        mods, ch = [], n_feats
        for _ in range(layers):
            mods += [nn.Conv1d(ch, channels, kernel, padding=kernel // 2), nn.BatchNorm1d(channels), nn.ReLU()]
            ch = channels
        self.body = nn.Sequential(*mods)
        self.out = nn.Conv1d(ch, n_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, T, F] -> log-posteriors [B, T, C]."""
        return torch.log_softmax(self.out(self.body(x.transpose(1, 2))), 1).transpose(1, 2)


def _labels(classes: list[int], frames: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.repeat(np.asarray(classes, dtype=np.int64), frames))


def _batches(n: int, lens: list[int], max_frames: int, rng: np.random.Generator):
    order = rng.permutation(n)
    cur, tot = [], 0
    for i in order:
        if cur and tot + lens[i] > max_frames:
            yield cur
            cur, tot = [], 0
        cur.append(int(i))
        tot += lens[i]
    if cur:
        yield cur


def _pad(seqs: list[torch.Tensor], value=0.0) -> torch.Tensor:
    return nn.utils.rnn.pad_sequence(seqs, batch_first=True, padding_value=value)


def realign(logp: list[torch.Tensor], classes: list[list[int]], prior: list[torch.Tensor] | None = None,
            prior_weight: float = 1.0) -> list[np.ndarray]:
    """MAS over each utterance's [T, C] log-posteriors for its class sequence -> frame counts per unit."""
    B = len(logp)
    U = max(len(c) for c in classes)
    T = max(lp.shape[0] for lp in logp)
    value = torch.zeros(B, U, T)
    mask = torch.zeros(B, U, T)
    for b, (lp, c) in enumerate(zip(logp, classes)):
        v = lp[:, torch.as_tensor(c)].t()
        if prior is not None:
            v = v + prior_weight * prior[b][:, torch.as_tensor(c)].t()
        value[b, : len(c), : lp.shape[0]] = v.clamp_min(-1e4)
        mask[b, : len(c), : lp.shape[0]] = 1
    counts = maximum_path(value, mask).sum(-1).long().numpy()
    return [counts[b, : len(c)] for b, c in enumerate(classes)]


def refine(feats: list[torch.Tensor], classes: list[list[int]], frames: list[np.ndarray], n_classes: int,
           rounds: int = 2, epochs: int = 4, lr: float = 2e-3, max_frames: int = 6000, seed: int = 0,
           kernel: int = 3, layers: int = 2, prior: list[torch.Tensor] | None = None, prior_weight: float = 1.0,
           log=None) -> list[np.ndarray]:
    """Viterbi re-training: ``rounds`` x (train a frame classifier ``epochs`` epochs on the current alignment, MAS).

    ``feats``: per-utterance [T, F] features; ``classes``: per-utterance unit class ids; ``frames``: first-pass
    frame counts per unit (sum = T). Returns the refined frame counts.
    """
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    lens = [f.shape[0] for f in feats]
    mean = torch.cat(feats).mean(0)
    std = torch.cat(feats).std(0).clamp_min(1e-3)
    feats = [(f - mean) / std for f in feats]
    for r in range(rounds):
        model = FrameClassifier(feats[0].shape[1], n_classes, kernel=kernel, layers=layers)
        opt = torch.optim.Adam(model.parameters(), lr=lr)
        labels = [_labels(c, f) for c, f in zip(classes, frames)]
        model.train()
        for ep in range(epochs):
            tot, n = 0.0, 0
            for idx in _batches(len(feats), lens, max_frames, rng):
                x = _pad([feats[i] for i in idx])
                y = _pad([labels[i] for i in idx], -100).long()
                lp = model(x)
                loss = nn.functional.nll_loss(lp.reshape(-1, n_classes), y.reshape(-1), ignore_index=-100)
                opt.zero_grad()
                loss.backward()
                opt.step()
                tot += float(loss.detach()) * len(idx)
                n += len(idx)
            if log:
                log(f"refine round {r + 1} epoch {ep + 1}: frame NLL {tot / max(n, 1):.3f}")
        model.eval()
        with torch.inference_mode():
            logp = []
            for idx in _batches(len(feats), lens, max_frames * 4, np.random.default_rng(0)):
                out = model(_pad([feats[i] for i in idx]))
                logp += [(i, out[k, : lens[i]]) for k, i in enumerate(idx)]
            logp = [lp for _, lp in sorted(logp, key=lambda p: p[0])]
        new = realign(logp, classes, prior, prior_weight)
        moved = float(np.mean([np.abs(np.cumsum(a) - np.cumsum(b)).mean() for a, b in zip(new, frames)]))
        if log:
            log(f"refine round {r + 1}: boundaries moved {moved:.2f} frames on average")
        frames = new
    return frames
