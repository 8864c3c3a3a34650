"""Boundary refinement: Viterbi re-training of a frame classifier on the corpus' own first-pass alignments.

The recognizer's scores place phones well but their boundaries loosely: CTC is peaky (a phone is one spike among
blanks) and the attention is smooth, so the first-pass MAS path is often a frame or two off, with a bias. HMM
aligners (MFA, HTK) sharpen boundaries by iterating: align, re-train frame models on the alignment, re-align. This
module does the same with a small neural frame classifier:

1. frame labels from the current alignment (each feature frame gets the token whose span holds its centre); frames
   within ``margin_ms`` of a boundary (at most ``margin_frac`` of the segment) are left out: their label is the
   unsure part;
2. train :class:`FrameClassifier` (cross-entropy per frame) on them, on finer frames than the recognizer's
   (``hop_ms``, 5 ms);
3. re-align: MAS over the classifier's prior-scaled log-posteriors (hybrid NN/HMM: log p(token|frame) - log p(token))
   of the transcript's tokens (every token >= 1 frame);
4. repeat from 1 with the new alignment (``rounds``), fine-tuning the same classifier.

Why it converges to the acoustic boundaries rather than to the first pass's: the first pass is biased per phone
context (on the built-in benchmark, +11 ms late on average and +35 ms at speech-to-silence edges). A classifier
with a wide receptive field learns that bias and reproduces it (measured: it does not move). This one sees
~65 ms around a frame (the EM mechanism of HMM aligners with local emissions) and never the frames next to a
boundary, so where it switches from one phone to the next is decided by the sound. Measured on
``benchmarks/accuracy.py`` (300 utterances): 22.1 ms -> 11.5 ms mean |error|, 64 % -> 85 % within 20 ms,
in ~30 s for 18 minutes of audio on 2 CPU cores.

Features: 80 log-mel bands (25 ms window) at ``hop_ms``, normalised per utterance. Frame ``f`` is centred at
``f * hop`` (``center=True``), the convention of ``common.frames``.

``refine_boundaries`` is the export's whole refinement: this loop, then two HMM-GMM ensembles (``common.hmm``, one
started from the first pass's (or the classifier's) alignment, one from a flat start), each boundary a gated
weighted mean of the members (``fuse_boundaries``), then a boundary detector trained on those fused boundaries
(``common.boundary_detector``) as one more member, fused again. Its knobs are ``RefineConfig`` / ``HMMConfig`` /
``DetectorConfig``, declared in ``hparams/export.yaml``.
"""
from __future__ import annotations

import dataclasses
import math
import random
import threading
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from common import frames as F
from common.ddp import SINGLE, Shard
from common.mas import LOG_FLOOR, mas_frames, set_threads
from common.audio import length_buckets, sample_hours

IGNORE = -100


@dataclass
class RefineConfig:
    """Defaults: the best measured on benchmarks/accuracy.py (see the module docstring and the issue notes)."""
    hop_ms: float = 5.0
    win_ms: float = 25.0
    rounds: int = 8
    epochs: int = 4            # the first round; later rounds fine-tune for epochs_later
    epochs_later: int = 3
    max_minutes: float = 0.0   # >0: wall-clock cap on all training (the rounds share it)
    max_train_hours: float = 2.0  # train on at most this much audio (the whole corpus is re-aligned)
    # measured: 64 / 96 / 128 / 192 -> 12.0 / 11.1 / 11.6 / 11.9 ms (less room to learn the bias)
    channels: int = 96
    kernel: int = 5
    dilations: tuple = (1, 1)  # residual conv blocks; receptive field (kernel - 1) * (1 + sum) + 1 frames (65 ms)
    lr: float = 2e-3
    batch_seconds: float = 40.0
    prior_weight: float = 0.8  # subtract prior_weight * log p(token) (hybrid NN/HMM posterior scaling, damped)
    margin_ms: float = 40.0    # frames this close to a boundary are not trained on (their label is unsure)
    margin_frac: float = 0.3   # ... at most this fraction of the segment's length (its centre frames always train)
    margin_decay: float = 1.0  # the margin is multiplied by this each round
    seed: int = 0
    sample_rate: int = 16000
    phone_features: bool = False  # token logits share a projection of the tokens' phonological features
    precision: str = "fp32"  # the classifier's compute: fp32 or bf16 (autocast; the export passes its resolved
    # --precision: bf16 on CUDA and on CPUs with native bf16, where it trains ~2x faster)


REFINE_PRECISIONS = ("fp32", "bf16")


class FrameClassifier(nn.Module):
    """log-mel frames -> per-frame token logits: a residual conv stack (TDNN-like; with the defaults 3 layers of
    kernel 5, a 65 ms receptive field at 5 ms frames). Convolutions only: on CPU they train several times faster
    than a recurrent layer of the same size."""

    def __init__(self, n_tokens: int, n_mels: int = 80, channels: int = 96, dilations=(1, 1), kernel: int = 5,
                 unit_feats: np.ndarray | None = None):
        kernel = max(1, kernel | 1)  # odd: 'same' padding
        super().__init__()
        self.inp = nn.Sequential(nn.Conv1d(n_mels, channels, kernel, padding=kernel // 2),
                                 nn.BatchNorm1d(channels), nn.ReLU())
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Conv1d(channels, channels, kernel, padding=d * (kernel // 2), dilation=d),
                          nn.BatchNorm1d(channels), nn.ReLU()) for d in dilations)
        self.out = nn.Conv1d(channels, n_tokens, 1)
        # phonological features (common.phonology): a token's logit is its own output plus a projection of its
        # features, so phones with few frames learn from the phones that share their features
        self.feat_out = None
        if unit_feats is not None:
            self.register_buffer("unit_feats", torch.as_tensor(np.asarray(unit_feats), dtype=torch.float32))
            self.feat_out = nn.Conv1d(channels, self.unit_feats.shape[1], 1, bias=False)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, T, n_mels] (padding frames are zeros) -> logits [B, T, n_tokens]."""
        h = self.inp(x.transpose(1, 2))
        for blk in self.blocks:
            h = h + blk(h)
        y = self.out(h)
        if self.feat_out is not None:
            y = y + torch.einsum("bdt,kd->bkt", self.feat_out(h), self.unit_feats)
        return y.transpose(1, 2)


class Features:
    """80 log-mel bands at ``hop_ms`` (25 ms window), per-utterance mean/variance normalised."""

    def __init__(self, sample_rate: int = 16000, hop_ms: float = 5.0, n_mels: int = 80, win_ms: float = 25.0):
        import torchaudio

        self.hop_s = hop_ms / 1000.0
        self.hop = int(round(sample_rate * self.hop_s))
        self.mel = torchaudio.transforms.MelSpectrogram(sample_rate, n_fft=512,
                                                        win_length=int(win_ms / 1000.0 * sample_rate),
                                                        hop_length=self.hop, n_mels=n_mels, center=True)

    def __call__(self, wav: torch.Tensor) -> torch.Tensor:
        """1-D waveform -> [T, n_mels] with T = 1 + len // hop."""
        with torch.no_grad():
            m = torch.log(self.mel(wav.float()) + 1e-6).t()
            return (m - m.mean(0)) / (m.std(0) + 1e-5)


def frame_labels(unit_ids: list[int], ends_s, n_frames: int, hop_s: float, margin_s: float = 0.0,
                 margin_frac: float = 0.3) -> np.ndarray:
    """Per frame, the id of the unit whose span [previous end, end) holds the frame centre ``f * hop_s``; with a
    margin, frames closer than ``min(margin_s, margin_frac * span length)`` to a span edge get ``IGNORE``."""
    ends = np.asarray(ends_s, dtype=np.float64)
    centres = np.arange(n_frames) * hop_s
    k = np.minimum(np.searchsorted(ends, centres, side="right"), len(unit_ids) - 1)
    lab = np.asarray(unit_ids, dtype=np.int64)[k]
    if margin_s > 0:
        starts = np.concatenate([[0.0], ends[:-1]])
        m = np.minimum(margin_s, margin_frac * (ends - starts))[k]
        near = np.minimum(centres - starts[k], ends[k] - centres) < m
        near &= ~((k == 0) & (centres - starts[k] < m) & (ends[k] - centres >= m))  # the audio start is no boundary
        near &= ~((k == len(unit_ids) - 1) & (ends[k] - centres < m) & (centres - starts[k] >= m))  # nor its end
        lab[near] = IGNORE
    return lab


def unit_label_ids(ids: list[int], lead: bool, trail: bool, blank_id: int = 0) -> list[int]:
    """Class ids of the aligned units: the token ids, with the blank id for the silence edge slots."""
    return ([blank_id] if lead else []) + list(ids) + ([blank_id] if trail else [])


def _batches(lengths: list[int], frames_per_batch: int, shuffle: bool, rng: random.Random) -> list[list[int]]:
    out = length_buckets(lengths, frames_per_batch)
    if shuffle:
        rng.shuffle(out)
    return out


def _pad(feats: list[torch.Tensor], device) -> tuple[torch.Tensor, torch.Tensor]:
    lens = torch.tensor([f.shape[0] for f in feats])
    x = torch.zeros(len(feats), int(lens.max()), feats[0].shape[1])
    for b, f in enumerate(feats):
        x[b, : f.shape[0]] = f.float()
    return x.to(device), lens


def _autocast(device: str, cfg: RefineConfig):
    """bf16 autocast around the classifier's forward pass when ``cfg.precision`` is bf16 (checked by ``refine``)."""
    return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16,
                          enabled=cfg.precision == "bf16")


def train_classifier(model: FrameClassifier, feats: list[torch.Tensor], labels: list[np.ndarray], epochs: int,
                     cfg: RefineConfig, deadline: float | None = None, device: str = "cpu",
                     log=None) -> list[float]:
    """Cross-entropy training on frame labels; returns the mean loss of each epoch run (stops at ``deadline``)."""
    rng = random.Random(cfg.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    batches = _batches([f.shape[0] for f in feats], int(cfg.batch_seconds / (cfg.hop_ms / 1000.0)), True, rng)
    total = max(1, epochs * len(batches))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
    model.train()
    losses = []
    for ep in range(epochs):
        rng.shuffle(batches)
        tot, n, t_ep = 0.0, 0, time.time()
        for idx in batches:
            x, lens = _pad([feats[i] for i in idx], device)
            y = torch.full(x.shape[:2], IGNORE, dtype=torch.long)
            for b, i in enumerate(idx):
                y[b, : len(labels[i])] = torch.from_numpy(labels[i])
            with _autocast(device, cfg):
                logits = model(x, lens).float()
            loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.to(device).reshape(-1),
                                               ignore_index=IGNORE)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 5.0)
            opt.step()
            sched.step()
            tot, n = tot + float(loss.detach()), n + 1
        losses.append(tot / max(n, 1))
        if log:
            log(f"refine epoch {ep + 1}/{epochs}: frame loss {losses[-1]:.3f} ({time.time() - t_ep:.1f} s)")
        if deadline is not None and time.time() > deadline:
            break
    model.eval()
    return losses


def log_priors(labels: list[np.ndarray], n_tokens: int) -> torch.Tensor:
    lab = np.concatenate(labels)
    counts = np.bincount(lab[lab >= 0], minlength=n_tokens).astype(np.float64) + 1.0
    return torch.from_numpy(np.log(counts / counts.sum())).float()


@torch.inference_mode()
def realign(model: FrameClassifier, feats: list[torch.Tensor], unit_ids: list[list[int]], cfg: RefineConfig,
            priors: torch.Tensor | None = None, device: str = "cpu",
            shard: Shard = SINGLE) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """MAS over the classifier's log-posteriors of each utterance's units: (frame counts, per-unit confidence).
    Under ``shard`` each process aligns its share of the batches and every process gets all results."""
    done: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    batches = _batches([f.shape[0] for f in feats], int(4 * cfg.batch_seconds / (cfg.hop_ms / 1000.0)), False,
                       random.Random(0))
    for idx in shard.take(batches):
        x, lens = _pad([feats[i] for i in idx], device)
        with _autocast(device, cfg):
            logits = model(x, lens)
        logp = torch.log_softmax(logits.float(), -1).cpu()
        scores, lengths = [], []
        for b, i in enumerate(idx):
            T = int(lens[b])
            ids = torch.as_tensor(unit_ids[i])
            s = logp[b, :T, ids].t()
            if priors is not None and cfg.prior_weight:
                s = s - cfg.prior_weight * priors[ids][:, None]
            scores.append(s.clamp_min(LOG_FLOOR))
            lengths.append(T)
        frames = mas_frames(scores, lengths)
        for b, i in enumerate(idx):
            fr = np.asarray(frames[b], dtype=np.int64)
            unit = np.repeat(np.arange(len(fr)), fr)  # each frame's unit (the MAS path covers every frame)
            ids = torch.as_tensor(np.asarray(unit_ids[i], dtype=np.int64)[unit])
            post = logp[b, torch.arange(len(unit)), ids].exp().double().numpy()  # each frame's own unit's posterior
            done[i] = (fr, np.bincount(unit, weights=post, minlength=len(fr)) / np.maximum(fr, 1))
    done = shard.gather(done)
    return [done[i][0] for i in range(len(feats))], [done[i][1] for i in range(len(feats))]


def classifier_features(load_wav, n_utts: int, cfg: RefineConfig) -> tuple[list[torch.Tensor], list[float]]:
    """Every utterance's classifier features (fp16, [T, n_mels]) and duration (s): its audio is read here."""
    fx = Features(cfg.sample_rate, cfg.hop_ms, win_ms=cfg.win_ms)
    feats, durations = [], []
    for i in range(n_utts):
        w = load_wav(i)
        feats.append(fx(w).half())
        durations.append(len(w) / cfg.sample_rate)
    return feats, durations


def refine(load_wav, n_utts: int, unit_ids: list[list[int]], first_ends_s: list[np.ndarray], n_tokens: int,
           cfg: RefineConfig, device: str = "cpu", log=None, fixed_ends_s: dict[int, np.ndarray] | None = None,
           timing: dict | None = None, shard: Shard = SINGLE, class_names: list[str] | None = None,
           features_out: list | None = None, features: tuple | None = None, fit_out: dict | None = None
           ) -> tuple[list[np.ndarray], list[np.ndarray], dict]:
    """The whole loop. ``load_wav(i)`` gives utterance ``i``'s waveform at ``cfg.sample_rate`` (read once; only its
    features are kept, in fp16: ~1.2 GB per 10 hours); ``first_ends_s[i]`` the end time (s) of each of its
    ``unit_ids[i]`` (class ids < ``n_tokens``). ``fixed_ends_s[i]``: hand-checked unit end times of utterance
    ``i``; its training labels stay those in every round, with no unsure margin (semi-supervised: the classifier
    learns where the labeller puts boundaries). ``class_names[k]``: the token of class ``k``, for
    ``cfg.phone_features`` (``common.phonology``). Returns (per-unit frame counts at ``cfg.hop_ms``, per-unit
    confidence = mean classifier posterior over its frames, stats); wall-clock seconds go to ``timing``.
    ``features_out``: a list that receives every utterance's features (for ``common.boundary_detector``);
    ``features``: ``classifier_features``' result when the caller read the audio already; ``fit_out``: a dict
    that receives the trained classifier (``classifier_state``; ``apply_classifier`` aligns other rows with it)."""
    if cfg.precision not in REFINE_PRECISIONS:
        raise ValueError(f"precision must be {' or '.join(REFINE_PRECISIONS)}, got {cfg.precision!r}")
    torch.manual_seed(cfg.seed)
    t0 = time.time()
    deadline = t0 + 60 * cfg.max_minutes if cfg.max_minutes > 0 else None
    hop_s = cfg.hop_ms / 1000.0  # the features' frame shift (Features.hop_s)
    feats, durations = classifier_features(load_wav, n_utts, cfg) if features is None else features
    if features_out is not None:
        features_out.extend(feats)
    train_idx, acc = sample_hours(list(range(n_utts)), durations, cfg.max_train_hours, cfg.seed)
    fixed = {i: np.asarray(e, dtype=np.float64) for i, e in (fixed_ends_s or {}).items()}
    if fixed:
        train_idx = sorted(set(train_idx) | set(fixed))
    unit_feats = None
    if cfg.phone_features:
        if class_names is None or len(class_names) != n_tokens:
            raise ValueError("phone_features needs the token name of every class (class_names)")
        from common.phonology import unit_features

        unit_feats = unit_features(class_names)
    model = FrameClassifier(n_tokens, feats[0].shape[1], cfg.channels, tuple(cfg.dilations), cfg.kernel,
                            unit_feats).to(device)
    ends = [fixed.get(i, np.asarray(e, dtype=np.float64)) for i, e in enumerate(first_ends_s)]
    stats = {"rounds": [], "train_utts": len(train_idx), "train_audio_s": round(acc, 1), "fixed_utts": len(fixed)}
    if timing is not None and features is None:
        timing["refine_features_s"] = round(time.time() - t0, 2)
    counts: list[np.ndarray] = []
    confs: list[np.ndarray] = []
    for r in range(max(1, cfg.rounds)):
        margin = cfg.margin_ms / 1000.0 * cfg.margin_decay ** r
        labels = [frame_labels(unit_ids[i], ends[i], feats[i].shape[0], hop_s, 0.0 if i in fixed else margin,
                               cfg.margin_frac) for i in range(n_utts)]
        losses = []
        if shard.main:  # trained once (rank 0), then shared: every process aligns with the same weights
            losses = train_classifier(model, [feats[i] for i in train_idx], [labels[i] for i in train_idx],
                                      cfg.epochs if r == 0 else cfg.epochs_later, cfg, deadline, device, log)
        if shard.world > 1:
            state, losses = shard.broadcast(({k: v.cpu() for k, v in model.state_dict().items()}, losses)
                                            if shard.main else None)
            model.load_state_dict(state)
            model.eval()
        priors = log_priors([labels[i] for i in train_idx], n_tokens)
        counts, confs = realign(model, feats, unit_ids, cfg, priors, device, shard)
        new_ends = [F.frame_ends_seconds(c, hop_s, d) for c, d in zip(counts, durations)]
        inner = np.concatenate([np.abs(a[:-1] - b[:-1]) for a, b in zip(new_ends, ends)])
        moved = float(inner.mean()) * 1000 if inner.size else 0.0
        ends = [fixed.get(i, e) for i, e in enumerate(new_ends)]
        stats["rounds"].append({"epochs": len(losses), "frame_loss": round(losses[-1], 4) if losses else None,
                                "mean_boundary_move_ms": round(moved, 2)})
        if log:
            log(f"refine round {r + 1}/{cfg.rounds}: boundaries moved {moved:.1f} ms on average")
        if shard.broadcast(deadline is not None and time.time() > deadline):  # rank 0's clock decides for all
            break
    if timing is not None:
        timing["refine_classifier_s"] = round(time.time() - t0, 2)
    if fit_out is not None:
        fit_out.update(classifier_state(model, priors))
    return counts, confs, stats


def classifier_state(model: FrameClassifier, priors: torch.Tensor) -> dict:
    """A trained classifier as plain types and tensors: its shape, weights and the log priors it aligns with."""
    blocks = [b[0] for b in model.blocks]
    return {"args": {"n_tokens": model.out.out_channels, "n_mels": model.inp[0].in_channels,
                     "channels": model.out.in_channels, "dilations": [b.dilation[0] for b in blocks],
                     "kernel": model.inp[0].kernel_size[0]},
            "state": {k: v.detach().cpu() for k, v in model.state_dict().items()}, "priors": priors}


def apply_classifier(state: dict, feats: list[torch.Tensor], unit_ids: list[list[int]], cfg: RefineConfig,
                     device: str = "cpu", shard: Shard = SINGLE) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """``realign`` with a trained classifier (``classifier_state``): what its last round gives its own rows."""
    feats_of = state["state"].get("unit_feats")
    model = FrameClassifier(**state["args"], unit_feats=None if feats_of is None else feats_of.numpy()).to(device)
    model.load_state_dict(state["state"])
    model.eval()
    return realign(model, feats, unit_ids, cfg, state["priors"], device, shard)


# --------------------------------------------------------------------------------------------------------------------
# The export's refinement: the frame classifier, then two HMM-GMMs, fused
# --------------------------------------------------------------------------------------------------------------------
class Helper:
    """A second thread that joins a list of independent jobs once the caller ``open()``s it (its own other work,
    e.g. the export's first pass, is done): ``run(jobs)`` runs them in the calling thread and, once open, in the
    helper too, whichever is free taking the next; each job runs on one thread wherever it runs, so the results
    (in job order) are the same as one after the other. ``close()`` when done."""

    def __init__(self):
        from concurrent.futures import ThreadPoolExecutor

        self._gate = threading.Event()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="refine-helper")

    def open(self) -> None:
        self._gate.set()

    def close(self) -> None:
        self._gate.set()
        self._pool.shutdown(wait=True)

    def run(self, jobs: list) -> list:
        results: list = [None] * len(jobs)
        todo, errors = list(range(len(jobs))), []
        cond = threading.Condition()
        state = {"running": 0}

        def work(helper: bool) -> None:
            if helper:
                self._gate.wait()
                set_threads(1)
            while True:
                with cond:
                    if not todo or errors:
                        return
                    i = todo.pop(0)
                    state["running"] += 1
                try:
                    results[i] = jobs[i]()
                except BaseException as err:  # noqa: BLE001 - handed to the caller below
                    errors.append(err)
                finally:
                    with cond:
                        state["running"] -= 1
                        cond.notify_all()

        self._pool.submit(work, True)
        work(False)
        with cond:  # the jobs the helper took are finished (a helper still waiting for the gate took none)
            cond.wait_for(lambda: state["running"] == 0)
        if errors:
            raise errors[0]
        return results

FUSION_GRID_S = 0.001  # fused boundaries are kept on a 1 ms grid
FUSIONS = ("mean", "median", "gated")
HMM_INITS = ("classifier", "first_pass")  # what the HMM-GMM that is not flat-started is trained from


def fuse_boundaries(members: list[tuple[float, list]], fallback: list[np.ndarray], how: str = "mean",
                    gate_s: float = 0.04) -> list[np.ndarray]:
    """Per utterance, the members' unit end times fused (``members``: ``(weight, ends per utterance)``, an entry
    None where that member skipped the utterance): ``mean``, the weighted mean; ``median``, the median of the
    members with a weight > 0, boundary by boundary (robust to one member that is far off, e.g. a flat start that
    learnt silence as a phone); ``gated``, boundary by boundary the weighted mean of the members within ``gate_s``
    of the members' median (a member's vote counts where it is near the others: where one is far off, a gross
    error of that member, it is left out; elsewhere it is the mean). ``fallback[i]`` where no member has utterance
    ``i``."""
    if how not in FUSIONS:
        raise ValueError(f"fusion must be one of {FUSIONS}, got {how!r}")
    out = []
    for i, base in enumerate(fallback):
        have = [(w if np.isscalar(w) else w[i], m[i]) for w, m in members
                if (w > 0 if np.isscalar(w) else w[i] is not None) and m[i] is not None]
        if not have:
            out.append(base)
            continue
        X = np.stack([m for _, m in have])
        w = np.stack([np.broadcast_to(np.asarray(w, dtype=np.float64), X.shape[1:]) for w, _ in have])
        if how == "mean":
            out.append((w * X).sum(0) / w.sum(0))
            continue
        med = np.median(X, axis=0)
        if how == "gated":
            near = np.abs(X - med) <= gate_s + 1e-9
            wn = (w * near).sum(0)
            med = np.where(wn > 0, (w * near * X).sum(0) / np.maximum(wn, 1e-12), med)
        out.append(np.maximum.accumulate(med))
    return out


def cap_final_phone(units: list[list[str]], ends: list[np.ndarray], k: float, silence=frozenset()) -> int:
    """In place: the phone right before an utterance's trailing silence ends at most ``k`` x the median duration
    of that phone's other (non-final) occurrences in the corpus (all phones' median when it has fewer than 3). A
    word-final closure (a stop, a glottal stop) is as silent as the pause after it, so an aligner lets it swallow
    that pause. Returns the number of rows changed."""
    durs: dict[str, list[float]] = {}
    for u, e in zip(units, ends):
        last = len(u) - 2 if u and u[-1] in silence else len(u)
        starts = np.concatenate([[0.0], e[:-1]])
        for j, tok in enumerate(u):
            if tok not in silence and j != last:
                durs.setdefault(tok, []).append(float(e[j] - starts[j]))
    pooled = [x for v in durs.values() for x in v]
    if not pooled:
        return 0
    everything = float(np.median(pooled))
    med = {t: float(np.median(v)) for t, v in durs.items() if len(v) >= 3}
    changed = 0
    for u, e in zip(units, ends):
        j = len(u) - 2
        if j < 0 or u[-1] not in silence or u[j] in silence:
            continue
        cap = (e[j - 1] if j > 0 else 0.0) + k * med.get(u[j], everything)
        if e[j] > cap:
            e[j] = cap
            changed += 1
    return changed


def _hmm_units(unit_ids: list[list[int]], n_tokens: int, hmm, class_names: list[str] | None, tied=None,
               classes=None):
    """The HMM-GMMs' unit ids (``hmm.tie_min_count``: rare units tied to a frequent similar one; ``tied``: the
    tying of a stored fit, else worked out from these rows) and config (the context class of every unit when a
    variant is context-dependent: ``classes``, else worked out from ``class_names``), stats and the tying (None
    without)."""
    hmm_ids, stats = unit_ids, {}
    if hmm.tie_min_count > 0:  # rare units share the GMMs of a frequent unit with similar features
        if class_names is None:
            raise ValueError("tie_min_count needs the token name of every class (class_names)")
        from common.phonology import tie_units

        if tied is None:
            occ = np.bincount(np.concatenate([np.asarray(u, dtype=np.int64) for u in unit_ids]),
                              minlength=n_tokens)
            tied = tie_units(class_names, occ, hmm.tie_min_count)
        tied = np.asarray(tied, dtype=np.int64)
        hmm_ids = [tied[np.asarray(u, dtype=np.int64)].tolist() for u in unit_ids]
        stats["hmm_tied_units"] = int((tied != np.arange(n_tokens)).sum())
    if any(c.context_min_count > 0 for c in hmm.variant_configs()) and not hmm.unit_classes:
        if class_names is None:
            raise ValueError("context_min_count needs the token name of every class (class_names)")
        from common.phonology import context_class

        hmm = dataclasses.replace(hmm, unit_classes=tuple(int(c) for c in classes) if classes is not None else
                                  tuple(context_class(t) for t in class_names))
    return hmm_ids, hmm, stats, tied


def refine_boundaries(load_wav, durations: list[float], unit_ids: list[list[int]], first_ends_s: list[np.ndarray],
                      n_tokens: int, cfg: RefineConfig, hmm=None, hmm_weight: float = 0.0,
                      flat_start_schedule=None, device: str = "cpu", log=None,
                      fixed_ends_s: dict[int, np.ndarray] | None = None, timing: dict | None = None,
                      shard: Shard = SINGLE, fusion: str = "mean", first_pass_weight: float = 0.0,
                      class_names: list[str] | None = None, hmm_init: str = "classifier", gate_s: float = 0.04,
                      flat_single: bool = False, closure=None, fusion_precision: bool = False,
                      detector=None, concurrent: bool = True, fitted: dict | None = None,
                      fit_out: dict | None = None, helper: Helper | None = None
                      ) -> tuple[list[np.ndarray], float, list[np.ndarray], dict, dict[str, list]]:
    """Refine every utterance's first-pass boundaries: ``refine`` (the frame classifier; skipped when
    ``cfg.rounds`` is 0: the HMM-GMMs then start from the first pass); then, when ``hmm_weight`` > 0, two HMM-GMM
    alignments (``common.hmm``, config ``hmm``; each an ensemble of ``hmm.variants`` over ``hmm.rounds``,
    ``common.hmm.hmm_ensemble``), one Viterbi-trained from an alignment we have (``hmm_init``: the classifier's, or
    the first pass's; without the classifier always the first pass's) and one from a flat start
    (``flat_start_schedule``; it shares none of the recognizer's or the classifier's errors); the boundaries are
    fused (``fuse_boundaries``, ``fusion``, ``gate_s``) with weights ``1 - hmm_weight`` for the classifier,
    ``hmm_weight`` shared equally by the HMM-GMM alignments and ``first_pass_weight`` for the first pass itself;
    ``flat_single``: the flat-start ensemble's first plain HMM-GMM (first variant, first round: MFA's monophone
    stage, ``common.hmm.Ensemble.first``) is a member of its own too; before the rounds pull it towards the other
    variants it shares nothing with the recognizer or the other members. ``closure``
    (``common.landmarks.ClosureSnap``): the fused vowel|stop boundaries move towards the closure landmark.
    ``detector`` (``common.boundary_detector.DetectorConfig``, weight > 0): a boundary detector trained on the
    fused boundaries joins the members and the boundaries are fused again (with the HMM-GMMs only: without them
    there is no fusion; needs ``class_names``). With
    ``hmm.tie_min_count``, rare units share a frequent similar unit's GMMs (``common.phonology.tie_units``, from
    ``class_names``). ``load_wav(i)``: utterance ``i`` at ``cfg.sample_rate`` (read once for every pass). Returns
    (unit end times per utterance, the grid (s) they are on: the classifier's hop, or 1 ms when fused; the
    classifier's per-unit confidence (None without it); stats, with the HMM-GMMs' per-row fit gap ``row_fit``; each
    member's end times by name). Wall-clock seconds
    per stage go to ``timing``. Under ``shard`` (a torchrun export) the classifier and the HMM-GMMs are trained by
    rank 0 and shared, and each process aligns its share of the batches. ``concurrent`` (one process only): the
    HMM-GMMs that do not start from the classifier train in worker threads while it trains (the same results as
    one after the other on the same thread counts; ``start`` below shares out the cores).

    ``fit_out``: a dict that receives every trained model (the classifier, each HMM-GMM ensemble, the detector:
    plain types and tensors, for ``torch.save``). ``fitted``: such a dict, trained before with the same settings
    (on this corpus or another): nothing is trained, each model aligns these rows as it aligned its own, and the
    same fusion follows. On the rows it was trained on, that gives the boundaries the training gave. ``helper``
    (``Helper``; with ``fitted``, not ``concurrent``): the stored HMM-GMMs' jobs are shared with it."""
    from common.hmm import FLAT_START_SCHEDULE, FeatureBank, apply_ensemble, ensemble_jobs, hmm_ensemble
    from common.landmarks import energy_envelope, snap_closures

    timing = {} if timing is None else timing
    use_hmm = hmm is not None and hmm_weight > 0
    if cfg.rounds <= 0 and not use_hmm:
        raise ValueError("refinement needs the frame classifier (rounds > 0) or the HMM-GMMs (hmm_weight > 0)")
    bank = FeatureBank(hmm.variant_configs()) if use_hmm else None
    envelopes = [] if use_hmm and closure is not None and closure.active else None
    use_det = use_hmm and detector is not None and detector.weight > 0  # a member of the HMM-GMMs' fusion
    if use_det:
        detector.check()
        if class_names is None:
            raise ValueError("the boundary detector needs the token name of every class (class_names)")
    det_feats: list = []
    det_fx = Features(cfg.sample_rate, cfg.hop_ms, win_ms=cfg.win_ms) if use_det and cfg.rounds <= 0 else None

    def load(i: int) -> torch.Tensor:  # the audio is read once for every pass
        w = load_wav(i)
        if bank is not None:
            bank.add(w)
        if envelopes is not None:
            envelopes.append(energy_envelope(w, cfg.sample_rate))
        if det_fx is not None:
            det_feats.append(det_fx(w).half())
        return w

    named = {"first_pass": list(first_ends_s)}
    if use_hmm and hmm_init not in HMM_INITS:
        raise ValueError(f"hmm_init must be one of {HMM_INITS}, got {hmm_init!r}")
    flat = ("flat_start", None, tuple(flat_start_schedule or FLAT_START_SCHEDULE))
    from_first = ("from_first_pass", list(first_ends_s), tuple(hmm.schedule) if use_hmm else ())
    units_lock, units_box = threading.Lock(), []

    if fitted is not None and fixed_ends_s:
        raise ValueError("hand-checked rows train the refiner: they need a refiner fitted here, not a stored one")
    if fitted is not None and use_det and fitted.get("detector") is None:
        raise ValueError("the stored refiner has no boundary detector: it was fitted with other settings")
    if fitted is not None and use_hmm and not fitted.get("hmm"):
        raise ValueError("the stored refiner has no HMM-GMMs: it was fitted with other settings")
    if fitted is not None and cfg.rounds > 0 and fitted.get("classifier") is None:
        raise ValueError("the stored refiner has no frame classifier: it was fitted with other settings")
    hmm_store = None if fit_out is None or not use_hmm else fit_out.setdefault("hmm", {})
    # every class's manner class (common.phonology: PanPhon's table, ~2 s to read), stored with the models
    stored_classes = None if fitted is None else fitted.get("classes")

    def hmm_units():
        """``_hmm_units``, worked out once by whichever job needs it first (the tying reads PanPhon's table: ~2 s
        that run beside the classifier)."""
        with units_lock:
            if not units_box:
                units_box.append(_hmm_units(unit_ids, n_tokens, hmm, class_names,
                                            None if fitted is None else fitted["hmm"]["tied"], stored_classes))
                if hmm_store is not None:
                    hmm_store["tied"] = None if units_box[0][3] is None else units_box[0][3].tolist()
        return units_box[0]

    def ensemble(name: str, init, sched, n_threads: int = 0):
        if n_threads:  # a worker thread's own thread counts
            set_threads(n_threads)
        t = {}
        hmm_ids, cfg_u, _, _ = hmm_units()
        if fitted is not None:  # the stored models align these rows
            ens = apply_ensemble(fitted["hmm"][name], bank, durations, hmm_ids, shard,
                                 first=name == "flat_start" and flat_single, timing=t)
            return name, ens, t.get("seconds")
        got = None if hmm_store is None else hmm_store.setdefault(name, {})
        ens = hmm_ensemble(bank, durations, hmm_ids, init, n_tokens, dataclasses.replace(cfg_u, schedule=sched),
                           cfg_u.schedule, log, t, shard, got)
        return name, ens, t.get("seconds")

    # the HMM-GMMs that do not start from the classifier train while it trains (worker threads of one process:
    # torch's and numba's kernels release the GIL); under torchrun every collective must run in the same order on
    # every rank, so there they run one after the other
    together = concurrent and use_hmm and shard.world == 1
    pending, pool, threads, previous = [], None, torch.get_num_threads(), None
    applied: dict = {}  # stored ensembles this thread applied beside the workers

    def start(jobs: list, main_busy: bool):
        """Run ``jobs`` in worker threads. The cores are shared out once, the same way on every run (torch's
        results depend on its thread count, so a share that followed the jobs' progress would not repeat): with
        the classifier on the CPU it keeps half (it scales with threads, the HMM-GMMs' small ops hardly do), and
        the HMM-GMMs run one after the other in one worker on fewer than 4 cores, each in its own above."""
        from concurrent.futures import ThreadPoolExecutor

        nonlocal pool, pending, previous
        main = max(1, threads // 2) if main_busy else 0
        workers = len(jobs) if threads - main >= 2 * len(jobs) or not main_busy else 1
        pool = ThreadPoolExecutor(workers)
        if main_busy:
            previous = set_threads(main)
        pending = [pool.submit(ensemble, *job, max(1, (threads - main) // workers)) for job in jobs]
        timing["hmm_workers"] = workers

    try:
        if cfg.rounds > 0:
            feats_c = None
            if together or fitted is not None:  # (else ``refine`` reads the audio itself)
                t = time.time()
                feats_c = classifier_features(load, len(durations), cfg)
                timing["refine_features_s"] = round(time.time() - t, 2)
            if together:
                # stored models need no alignment to start from: the flat-start one aligns in the worker while
                # this thread runs the classifier and then the other one, each on the thread counts it trained on
                start([flat] + ([from_first] if hmm_init == "first_pass" and fitted is None else []),
                      device == "cpu")
            if fitted is not None:  # the stored classifier aligns these rows
                t = time.time()
                if use_det:
                    det_feats.extend(feats_c[0])
                counts, confs = apply_classifier(fitted["classifier"], feats_c[0], unit_ids, cfg, device, shard)
                stats = {"applied": True}
                timing["refine_classifier_s"] = round(time.time() - t, 2)
                init_name = "from_classifier" if hmm_init == "classifier" else "from_first_pass"
                if pending and use_hmm:
                    applied[init_name] = ensemble(init_name, None, ())[1:]
                elif helper is not None and use_hmm:  # every stored HMM-GMM's job, shared with the helper
                    t = time.time()
                    hmm_ids = hmm_units()[0]
                    parts = {n: ensemble_jobs(fitted["hmm"][n], bank, durations, hmm_ids, shard,
                                              first=n == "flat_start" and flat_single)
                             for n in (init_name, "flat_start")}
                    results = helper.run([j for jobs, _ in parts.values() for j in jobs])
                    for n, (jobs, assemble) in parts.items():
                        applied[n] = (assemble(results[:len(jobs)]), None)
                        results = results[len(jobs):]
                    timing["hmm_applied_s"] = round(time.time() - t, 2)
            else:
                counts, confs, stats = refine(load, len(durations), unit_ids, first_ends_s, n_tokens, cfg, device,
                                              log, fixed_ends_s, timing, shard, class_names,
                                              det_feats if use_det else None, feats_c,
                                              None if fit_out is None else fit_out.setdefault("classifier", {}))
            hop_s = cfg.hop_ms / 1000.0
            ends = [F.frame_ends_seconds(c, hop_s, t) for c, t in zip(counts, durations)]
            named["classifier"] = ends
            if not use_hmm:
                return ends, hop_s, confs, stats, named
            weight = 1.0 - hmm_weight
        else:  # no classifier: the HMM-GMMs start from the first pass
            t = time.time()
            for i in range(len(durations)):
                load(i)
            timing["hmm_features_s"] = round(time.time() - t, 2)
            ends, confs, stats, weight = list(first_ends_s), [None] * len(durations), {}, 0.0
            if together:
                start([flat, from_first], False)
    except BaseException:
        if pool is not None:  # the jobs not yet started are dropped (the running ones finish first)
            pool.shutdown(wait=True, cancel_futures=True)
        raise
    finally:
        if pool is not None:
            pool.shutdown(wait=True)
            if previous is not None:
                set_threads(*previous)
    stats.update(hmm_units()[2])
    stats["hmm"] = {}
    init_job = ("from_classifier", ends, tuple(hmm.schedule)) if hmm_init == "classifier" and cfg.rounds > 0 \
        else from_first
    done = {name: (ens, sec) for name, ens, sec in (f.result() for f in pending)} | applied
    members = [(weight, ends), (first_pass_weight, list(first_ends_s))]
    fits, hmm_members, precisions = [], [], []
    for job in (init_job, flat):
        name = job[0]
        ens, sec = done[name] if name in done else ensemble(*job)[1:]
        stats["hmm"][name] = ens.stats
        if sec is not None:
            timing[f"hmm_{name}_s"] = sec
        fits.append(ens.row_fit)
        hmm_members.append((f"hmm_{name}", ens.ends))
        precisions.append(ens.precision)
        if name == "flat_start" and flat_single and (len(hmm.variant_configs()) > 1 or hmm.rounds > 1):
            hmm_members.append(("hmm_flat_start_single", ens.first))
            precisions.append(ens.first_precision)
    shares: list = [hmm_weight / len(hmm_members)] * len(hmm_members)  # the HMM-GMM weight, shared equally ...
    if fusion_precision and all(p is not None for p in precisions):
        # ... or boundary by boundary in proportion to each member's posterior precision
        totals = [np.sum([p[i] for p in precisions if p[i] is not None], axis=0) for i in range(len(durations))]
        shares = [[None if p[i] is None else hmm_weight * p[i] / totals[i] for i in range(len(durations))]
                  for p in precisions]
    for (name, h), w in zip(hmm_members, shares):
        members.append((w, h))
        named[name] = h
    # each row's HMM-GMM fit gap (common.hmm.fit_gaps), the mean of the two alignments': for the review flags
    have = [[f[i] for f in fits if f[i] is not None] for i in range(len(durations))]
    stats["row_fit"] = [round(float(np.mean(h)), 4) if h else None for h in have]
    if envelopes is not None and class_names is None:
        raise ValueError("closure snapping needs the token name of every class (class_names)")
    from common.phonology import CONTEXT_CLASSES, context_class

    kind = np.asarray(stored_classes, dtype=np.int64) if stored_classes is not None else \
        np.asarray([context_class(t) for t in class_names]) if class_names is not None else None
    if fit_out is not None and kind is not None:
        fit_out["classes"] = kind.tolist()

    def snapped(fused: list[np.ndarray]) -> tuple[list[np.ndarray], int]:
        """vowel|stop boundaries towards the closure landmark (a copy; unchanged without envelopes)."""
        if envelopes is None:
            return fused, 0
        vowel, stop = kind == CONTEXT_CLASSES.index("vowel"), kind == CONTEXT_CLASSES.index("stop")
        out, moved = [], 0
        for i, (e, u) in enumerate(zip(fused, unit_ids)):
            u = np.asarray(u, dtype=np.int64)
            e = np.array(e, dtype=np.float64)
            moved += snap_closures(e, vowel[u], stop[u], envelopes[i], closure)
            out.append(e)
        return out, moved

    fused = fuse_boundaries(members, ends, fusion, gate_s)
    if use_det:  # a boundary detector learns the fused boundaries and joins the members
        from common.boundary_detector import BoundaryDetector, detect, train_detector

        t = time.time()
        targets = list(snapped(fused)[0])
        for i, e in (fixed_ends_s or {}).items():  # hand-checked rows teach it the labeller's boundaries
            targets[i] = np.asarray(e, dtype=np.float64)
        classes = [kind[np.asarray(u, dtype=np.int64)] for u in unit_ids]
        hop_s, losses, state = cfg.hop_ms / 1000.0, [], None if fitted is None else fitted["detector"]
        if fitted is None and shard.main:  # trained once (rank 0), then shared, as the classifier
            model, losses = train_detector(det_feats, classes, targets, len(CONTEXT_CLASSES), hop_s, detector,
                                           device, log)
            state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
            if fit_out is not None:
                fit_out["detector"] = state
        if fitted is None and shard.world > 1:
            state, losses = shard.broadcast((state, losses) if shard.main else None)
        if fitted is not None or not shard.main:  # the stored detector, or the one rank 0 trained
            model = BoundaryDetector(len(CONTEXT_CLASSES), det_feats[0].shape[1], detector.channels).to(device)
            model.load_state_dict(state)
            model.eval()
        proposals = [m for w, m in members if not np.isscalar(w) or w > 0]
        found = detect(model, det_feats, classes, proposals, durations, hop_s, detector, device, shard)
        members.append((detector.weight, found))
        named["detector"] = found
        fused = fuse_boundaries(members, ends, fusion, gate_s)
        stats["detector"] = {"epochs": len(losses), "loss": round(losses[-1], 4) if losses else None}
        timing["detector_s"] = round(time.time() - t, 2)
    fused, moved = snapped(fused)
    if envelopes is not None:
        stats["closures_snapped"] = moved
    return fused, FUSION_GRID_S, confs, stats, named
