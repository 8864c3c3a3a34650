"""HMM-GMM forced alignment trained on the corpus itself (Viterbi training), as the Montreal Forced Aligner's
monophone stage (Kaldi ``train_mono``) does it.

- Features: 13 MFCCs + deltas + delta-deltas (regression over +-``delta_ms``), 25 ms window, ``hop_ms`` hop (10 ms),
  mean/variance normalised per utterance; frame ``t`` is centred at ``t * hop`` (``center=True``).
- Topology: ``states`` left-to-right emitting states per unit (self-loop or next), a diagonal-covariance GMM per
  state, a self-loop probability per state.
- Training: from an initial segmentation (a flat start, or an alignment we already have: each unit's frames split
  evenly over its states), repeat: re-estimate the GMMs on the current state segmentation (splitting the heaviest
  Gaussian of a state until it has ``schedule[i]`` of them, then a few EM steps on its frames), re-align.
- Viterbi with a self-loop probability per state is MAS over ``log p(x_t | state) + log a_self(state)``: every
  path leaves every state exactly once, so the exit terms add the same constant to every path. So the alignment
  step is our batched ``maximum_path`` (common/mas.py).

Used two ways: ``common.refine.refine_boundaries`` runs it twice after the neural refinement (once initialised from
that alignment, once from a flat start) and averages the three boundary sets (their errors are partly independent);
``benchmarks/hmm_gmm.py`` runs it from a flat start alone as the competitor baseline.
"""
from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass

import numpy as np
import torch

from common import frames as F
from common.ddp import SINGLE, Shard
from common.mas import _numba_available, mas_frames
from common.phonology import CONTEXT_SILENCE
from common.audio import length_buckets, sample_hours

LOG2PI = math.log(2 * math.pi)
VAR_FLOOR = 1e-3
EXP_FLOOR = -80.0  # exp() arguments are clamped here: exp(-80) ~ 2e-35 is nothing beside 1, and far lower ones are slow


FLAT_INITS = ("even", "vad", "auto")
MIXTURE_SCORES = ("sum", "max")
ENSEMBLE_WEIGHTS = ("mean", "precision")  # how an ensemble averages its members (HMMConfig.ensemble_weights)
POSTERIOR_POINTS = ("median", "mean")  # where a posterior_scale > 0 puts a boundary (HMMConfig.posterior_point)
# Kaldi-like schedule for a flat start: three passes per mixture size, Gaussians doubled up to 8 per state
FLAT_START_SCHEDULE = (1, 1, 1, 2, 2, 2, 4, 4, 4, 8, 8, 8)


@dataclass
class HMMConfig:
    """Defaults: measured on benchmarks/accuracy.py. From a flat start, 10 ms frames beat 5 ms (10.3 vs 12.0 ms mean
    boundary error) and 8 Gaussians per state beat 16 (10.3 vs 10.6 ms). Started from the neural refinement's
    alignment, the short schedule beat the flat-start one (9.6 vs 10.0 ms)."""
    hop_ms: float = 10.0
    delta_ms: float = 20.0
    win_ms: float = 25.0  # MFCC analysis window
    states: int = 3
    schedule: tuple = (1, 2, 4, 8, 8)  # Gaussians per state, one re-estimation + re-alignment each
    max_train_hours: float = 2.0  # train on a seeded sample of at most this much audio, then align every row
    seed: int = 0
    em_iters: int = 3
    sample_rate: int = 16000
    flat_start_max_s: float = 15.0  # a flat start runs on rows up to this long (the longer ones keep the others')
    flat_init: str = "even"  # a flat start's first segmentation: "even" (every state an equal share: MFA's), "vad"
    # (edge silence units first get what an energy detector finds silent at the start/end: energy_flat_start) or
    # "auto" (per row: vad where the detector finds more than vad_min_share of the row silent at its edges, as in
    # single-word field recordings; even elsewhere)
    vad_min_share: float = 0.35
    silence_ids: tuple = ()  # unit ids that are silence (the export gives the edge slots' and pau's); with none,
    # flat_init and split_trailing_silence change nothing
    split_trailing_silence: bool = False  # a trailing silence unit gets its own model, apart from the leading one
    tie_min_count: int = 0  # >0: a unit seen fewer times shares the GMMs of the most similar frequent unit
    # (phonological features, common.phonology.tie_units); 0 = every unit its own models
    variants: tuple = ()  # an ensemble: one HMM-GMM per entry (a dict of the fields it changes, e.g. the MFCC window),
    # their boundaries averaged (hmm_ensemble); () = one HMM-GMM with this config
    rounds: int = 1  # ensemble rounds: every later round re-trains each variant from the previous round's mean
    context_min_count: int = 0  # >0: context-dependent edge states (a light form of triphones): a unit's first
    # (last) state gets GMMs of its own for each manner class of the unit before (after) it (``unit_classes``,
    # common.phonology.context_class) that occurs at least this often in the corpus; rarer contexts share the unit's
    # context-free state; 0 = monophones
    unit_classes: tuple = ()  # the context class of every unit id (the export gives its tokens' manner classes)
    context_passes: int = 0  # >0: only the schedule's last this many passes are context-dependent, the ones before
    # train monophones (as MFA's triphone stage starts from its monophone alignment); 0 = every pass
    ensemble_weights: str = "mean"  # an ensemble's members averaged plainly (mean) or, boundary by boundary,
    # weighted by their posterior precision 1 / (sd^2 + sd_floor^2) (precision: needs posterior_scale > 0, else
    # the plain mean)
    sd_floor_ms: float = 5.0  # precision: added in quadrature to every member's posterior sd
    posterior_point: str = "median"  # with posterior_scale > 0: each boundary at its posterior median or mean
    posterior_scale: float = 0.0  # >0: the final alignment's unit boundaries are their posterior medians (means)
    # (forward-backward over the same path scores as Viterbi, scaled by this acoustic scale: below 1 flattens the
    # posterior, as Kaldi's lattice posteriors use 0.1) instead of the single best path's, in fractions of a frame;
    # 0 = the Viterbi path (training passes always use it; the export's default is 0.1)
    mixture_score: str = "sum"  # how alignment scores a frame under a state's GMM: "sum" (log of the mixture's
    # density, as Kaldi) or "max" (its best Gaussian: no exp per Gaussian, ~2x faster passes); the GMMs' EM
    # re-estimation is exact either way

    def variant_configs(self) -> list["HMMConfig"]:
        """One config per ensemble member (``variants`` applied to this one), or this config alone."""
        return [dataclasses.replace(self, variants=(), **dict(v)) for v in self.variants] or \
            [dataclasses.replace(self, variants=())]

    def feature_key(self) -> tuple:
        return (self.sample_rate, self.hop_ms, self.delta_ms, self.win_ms)


# what an ensemble member (``HMMConfig.variants`` entry) may change: any field but the ensemble's own and the
# export-given unit classes
VARIANT_KEYS = tuple(f.name for f in dataclasses.fields(HMMConfig)
                     if f.name not in ("variants", "rounds", "ensemble_weights", "sd_floor_ms", "unit_classes"))


class MFCC:
    """1-D waveform -> [T, 39] float32, per-utterance CMVN, T = 1 + len // hop."""

    def __init__(self, sample_rate: int = 16000, hop_ms: float = 10.0, delta_ms: float = 20.0, win_ms: float = 25.0):
        import torchaudio

        self.hop_s = hop_ms / 1000.0
        self.mfcc = torchaudio.transforms.MFCC(sample_rate, n_mfcc=13, melkwargs=dict(
            n_fft=512, win_length=int(round(win_ms / 1000.0 * sample_rate)),
            hop_length=int(round(sample_rate * self.hop_s)), n_mels=23, center=True))
        self.win = 2 * max(1, int(round(delta_ms / hop_ms))) + 1
        self._deltas = torchaudio.functional.compute_deltas

    def __call__(self, wav: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            c = self.mfcc(wav.float())
            d1 = self._deltas(c, win_length=self.win)
            x = torch.cat([c, d1, self._deltas(d1, win_length=self.win)]).t()
            return ((x - x.mean(0)) / (x.std(0) + 1e-5)).contiguous()


def gaussian_terms(mu: torch.Tensor, var: torch.Tensor, logw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Diagonal Gaussians ``mu``/``var`` [..., M, D] with log weights ``logw`` [..., M] -> (``1 / var``, each
    Gaussian's weighted log density at x = 0 [..., M]): ``log N(x) + logw = const - 0.5 * (x^2 . ivar - 2 x .
    mu ivar)``."""
    ivar = 1.0 / var
    return ivar, logw - 0.5 * (torch.log(var).sum(-1) + (mu * mu * ivar).sum(-1) + mu.shape[-1] * LOG2PI)


class StateGMMs:
    """Per state: M diagonal Gaussians (means, variances, log weights; unused slots have log weight -1e4) and a
    self-loop log-probability."""

    def __init__(self, n_states: int, dim: int):
        self.mu = torch.zeros(n_states, 1, dim)
        self.var = torch.ones(n_states, 1, dim)
        self.logw = torch.zeros(n_states, 1)
        self.log_self = torch.full((n_states,), math.log(0.5))
        self._key, self._cached = None, None  # _weights(): the parameters it was computed from, and its result

    def _weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every Gaussian's weighted log density as one linear map of [x^2, x] plus a constant ([M, S, 2D] and
        [M, S]): computed once per model (cached on the parameter tensors, which ``reestimate`` replaces)."""
        key = (self.mu, self.var, self.logw)
        if self._key is None or any(a is not b for a, b in zip(self._key, key)):
            ivar, const = gaussian_terms(self.mu, self.var, self.logw)  # [S, M, D], [S, M]
            w = torch.cat([-0.5 * ivar, self.mu * ivar], -1).transpose(0, 1).contiguous()  # [M, S, 2D]
            self._key, self._cached = key, (w, const.t().contiguous())
        return self._cached

    def loglik(self, x: torch.Tensor, states: torch.Tensor, mixture: str = "sum") -> torch.Tensor:
        """x [T, D], state ids [S] -> log p(x_t | state) [S, T]: the log-sum over each state's mixture, or with
        ``mixture="max"`` its best Gaussian's weighted log density (the Viterbi approximation of the mixture).
        A state that recurs in ``states`` (a phone said twice) is scored once."""
        states, inverse = torch.unique(states, return_inverse=True)
        w, const = self._weights()
        M, S = w.shape[0], len(states)
        # one matmul: the states' Gaussians (Gaussian-major rows, [M, S]) by [x^2, x]; the mixture reduction
        # below then runs over M whole [S, T] slices (vectorised) rather than over a last axis of M (1..8) values
        z = torch.addmm(const[:, states].reshape(M * S, 1), w.index_select(1, states).reshape(M * S, -1),
                        torch.cat([x * x, x], 1).t()).view(M, S, -1)  # [M, S, T]
        if M == 1:
            best = z[0]
        elif mixture == "max":
            best = z.amax(0)
        else:  # log-sum-exp over the mixture, shifted by each state's best Gaussian
            best = z.amax(0)
            # a Gaussian more than 80 nats below the best adds nothing to a sum >= 1 in float32, and exp() of far
            # negative arguments takes a path ~10x slower: clamped, the sum is the same, in a tenth of the time
            best = z.sub_(best).clamp_min_(EXP_FLOOR).exp_().sum(0).log_().add_(best)
        return best[inverse]

    def reestimate(self, x_all: torch.Tensor, labels: np.ndarray, n_mix: int, em_iters: int) -> None:
        """Fit each state's GMM to its frames (rows of ``x_all`` whose label is the state), splitting its heaviest
        Gaussian until it has ``n_mix`` (while it has >= 4 frames per Gaussian). A state without frames keeps its
        old GMM.

        All states at once: the splits run over the states together (one per step), and EM over states grouped by
        frame count (a power-of-two size class, padded to its largest with frames of no responsibility), a batched
        matmul per group, rather than a loop over the states (their count was the cost: hundreds of small ops
        each)."""
        S, M_old, D = self.mu.shape
        counts = np.bincount(labels, minlength=S)
        live = self.logw > -1e3  # [S, M_old]; a state's live Gaussians fill its first slots
        n_live = live.sum(1)
        keep = torch.from_numpy(counts < 2)
        # a state with frames splits up to n_mix Gaussians while it has >= 4 frames per Gaussian
        n_split = torch.maximum(n_live, torch.from_numpy(counts // 4).clamp(max=n_mix))
        n_new = torch.where(keep, n_live, n_split).clamp(max=n_mix)
        Mx = max(n_mix, M_old)
        mu = torch.zeros(S, Mx, D)
        var = torch.ones(S, Mx, D)
        logw = torch.full((S, Mx), -1e4)
        mu[:, :M_old], var[:, :M_old], logw[:, :M_old] = self.mu, self.var, torch.where(live, self.logw, -1e4)
        cur = n_live.clone()
        while True:  # one split per state per step: its heaviest Gaussian k -> (mu_k - eps, mu_k + eps), half weight
            todo = torch.nonzero((cur < n_new) & ~keep).flatten()
            if not len(todo):
                break
            k = torch.argmax(logw[todo], 1)
            j = cur[todo]
            eps = 0.2 * var[todo, k].sqrt()
            mu[todo, j] = mu[todo, k] + eps
            mu[todo, k] = mu[todo, k] - eps
            var[todo, j] = var[todo, k]
            half = logw[todo, k] - math.log(2.0)
            logw[todo, k] = half
            logw[todo, j] = half
            cur[todo] += 1
        used = torch.arange(Mx)[None, :] < n_new[:, None]  # [S, Mx]
        mu, var, logw = mu.masked_fill(~used[:, :, None], 0.0), var.masked_fill(~used[:, :, None], 1.0), \
            logw.masked_fill(~used, -1e4)
        # EM per size class of states with >= 2 frames
        order = np.argsort(labels, kind="stable")
        starts = np.concatenate([[0], np.cumsum(counts)])
        x_sorted = x_all[torch.from_numpy(order)]
        fit = np.flatnonzero(counts >= 2)
        size_class = np.ceil(np.log2(np.maximum(counts[fit], 1))).astype(np.int64)
        for c in np.unique(size_class):
            group = fit[size_class == c]
            n_max = int(counts[group].max())
            pos = np.arange(n_max)[None, :]
            inside = pos < counts[group][:, None]
            idx = np.where(inside, starts[group][:, None] + pos, 0)
            X = x_sorted[torch.from_numpy(idx)]  # [G, n_max, D]; padding frames get no responsibility below
            X2 = X * X
            real = torch.from_numpy(inside.astype(np.float32))[:, :, None]
            gi = torch.from_numpy(group)
            g_mu, g_var, g_logw, g_used = mu[gi], var[gi], logw[gi], used[gi]
            for _ in range(em_iters):  # a single Gaussian's responsibilities are exactly 1 (one finite logit)
                ivar, const = gaussian_terms(g_mu, g_var, g_logw)
                z = const[:, None, :] - 0.5 * (torch.bmm(X2, ivar.transpose(1, 2))
                                               - 2.0 * torch.bmm(X, (g_mu * ivar).transpose(1, 2)))
                # the softmax over the used Gaussians, by hand: torch.softmax over a last axis of 1..8 is slow,
                # and so is exp() far below 0 (clamped as in loglik: the same responsibilities)
                r = (z - z.masked_fill(~g_used[:, None, :], -torch.inf).amax(-1, keepdim=True)).clamp_min_(EXP_FLOOR)
                r = r.exp_().mul_(g_used[:, None, :])
                r = r.div_(r.sum(-1, keepdim=True)).mul_(real)
                n = (r.sum(1) + 1e-6) * g_used  # [G, Mx]; 0 for the unused slots
                nn = n.clamp(min=1e-30)[:, :, None]
                g_mu = torch.bmm(r.transpose(1, 2), X) / nn
                g_var = (torch.bmm(r.transpose(1, 2), X2) / nn - g_mu ** 2).clamp_min(VAR_FLOOR)
                g_logw = torch.log(n / n.sum(1, keepdim=True))  # -inf for the unused slots, masked above
            mu[gi] = g_mu.masked_fill(~g_used[:, :, None], 0.0)
            var[gi] = g_var.masked_fill(~g_used[:, :, None], 1.0)
            logw[gi] = g_logw.masked_fill(~g_used, -1e4)
        width = max(int(n_new.max()), 1)
        self.mu, self.var = mu[:, :width].contiguous(), var[:, :width].contiguous()
        self.logw = logw[:, :width].contiguous()


def split_counts(unit_counts, states: int) -> np.ndarray:
    """Frames per unit -> frames per state (each unit's frames split evenly over its states)."""
    n = np.asarray(unit_counts, dtype=np.int64)
    k = np.arange(states + 1)
    edges = np.floor(n[:, None] * k[None, :] / states + 0.5).astype(np.int64)  # [U, states + 1]
    return np.diff(edges, axis=1).reshape(-1)


def viterbi(model: StateGMMs, feats: list[torch.Tensor], seqs: list[torch.Tensor],
            frames_per_batch: int = 30000, shard: Shard = SINGLE, mixture: str = "sum") -> list[np.ndarray]:
    """Best state segmentation of each utterance (MAS over emission + self-loop log-probabilities, emissions
    scored by ``StateGMMs.loglik(..., mixture)``); under ``shard`` each process aligns its share of the batches
    and every process gets all results."""
    return [c for c, _ in align_rows(model, feats, seqs, frames_per_batch, shard, mixture)]


def align_rows(model: StateGMMs, feats: list[torch.Tensor], seqs: list[torch.Tensor],
               frames_per_batch: int = 30000, shard: Shard = SINGLE, mixture: str = "sum",
               posterior_scale: float = 0.0, median: bool = True) -> list[tuple[np.ndarray, tuple | None]]:
    """``viterbi``, and with ``posterior_scale`` > 0 from the same scores (times that scale) each state boundary's
    posterior median (mean) and variance (``boundary_posterior_means``): per row (state frame counts, None or
    (the frame where each state after the first begins, its variance))."""
    out: dict[int, tuple] = {}
    for idx in shard.take(length_buckets([f.shape[0] for f in feats], frames_per_batch)):
        scores = [model.loglik(feats[i], seqs[i], mixture) + model.log_self[seqs[i]][:, None] for i in idx]
        for i, fr, v in zip(idx, mas_frames(scores, [feats[i].shape[0] for i in idx]), scores):
            out[i] = (fr, None if posterior_scale <= 0 else
                      boundary_posterior_means((posterior_scale * v).double().numpy(), median, with_var=True))
    out = shard.gather(out)
    return [out[i] for i in range(len(feats))]


def boundary_posterior_means(v: np.ndarray, median: bool = False, with_var: bool = False):
    """Path scores ``v`` [S, T] (a path visits states 0..S-1 in order, each for >= 1 frame, and scores the sum of
    its cells, as ``mas_frames``) -> for each s < S-1 the posterior mean (``median``: median, each frame's mass
    spread over +-half a frame) of the frame where state s + 1 begins, over every path weighted by exp(score)
    (forward-backward in log space; float64 [S-1]); ``with_var``: also its variance (frames^2). The numba kernel
    (``common.mas_numba``) where numba is installed, else numpy (one vectorised step per frame, ~25x slower)."""
    v = np.ascontiguousarray(v, dtype=np.float64)
    if _numba_available():
        from common.mas_numba import boundary_posterior_means as kernel

        out, med, var = np.empty(v.shape[0] - 1), np.empty(v.shape[0] - 1), np.empty(v.shape[0] - 1)
        kernel(v, out, med, var)
        return ((med if median else out), var) if with_var else (med if median else out)
    return _boundary_posterior_means_np(v, median, with_var)


def _boundary_posterior_means_np(v: np.ndarray, median: bool = False, with_var: bool = False):
    S, T = v.shape
    ninf = np.full(1, -np.inf)
    a = np.full((S, T), -np.inf)
    b = np.full((S, T), -np.inf)
    a[0, 0] = v[0, 0]
    for t in range(1, T):
        prev = a[:, t - 1]
        a[:, t] = v[:, t] + np.logaddexp(prev, np.concatenate([ninf, prev[:-1]]))
    b[S - 1, T - 1] = 0.0
    for t in range(T - 2, -1, -1):
        nxt = b[:, t + 1] + v[:, t + 1]
        b[:, t] = np.logaddexp(nxt, np.concatenate([nxt[1:], ninf]))
    # state s + 1 begins at frame t: the path is in s at t - 1 and in s + 1 at t
    x = a[:-1, :-1] + v[1:, 1:] + b[1:, 1:]
    x = np.exp(x - x.max(axis=1, keepdims=True))
    x /= x.sum(axis=1, keepdims=True)
    t = np.arange(1, T)
    point = mean = (x * t).sum(axis=1)
    if median:
        cum = np.cumsum(x, axis=1)
        k = np.minimum((cum < 0.5).sum(axis=1), T - 2)  # the first frame whose cumulative mass reaches a half
        rows = np.arange(len(k))
        before = np.where(k > 0, cum[rows, k - 1], 0.0)
        point = k + 1 - 0.5 + (0.5 - before) / x[rows, k]
    return (point, (x * (t - mean[:, None]) ** 2).sum(axis=1)) if with_var else point


def state_sequences(unit_ids: list[list[int]], states: int, ctx: "ContextStates | None" = None
                    ) -> list[torch.Tensor]:
    """Each utterance's state ids: unit ``u``'s k-th state is ``u * states + k``, or with ``ctx`` its first/last
    state's context-dependent id where it has one."""
    if ctx is not None:
        return [ctx.sequence(ids) for ids in unit_ids]
    return [torch.tensor([u * states + k for u in ids for k in range(states)], dtype=torch.long) for ids in unit_ids]


class ContextStates:
    """Context-dependent edge states: a unit's first state split by the manner class of the unit before it, its
    last state by the class of the unit after it (the row's edges count as silence), for every (unit, side,
    class) seen at least ``min_count`` times in ``unit_ids``; ids from ``n_units * states`` on. Its middle
    states, and its edges in rarer contexts, stay context-free. With one state per unit both sides share it: the
    right context then decides."""

    SILENCE = CONTEXT_SILENCE  # what lies beyond a row's edges

    def __init__(self, unit_ids: list[list[int]], n_units: int, states: int, classes, min_count: int):
        self.states, self.classes = states, np.asarray(classes, dtype=np.int64)
        if len(self.classes) < n_units:
            raise ValueError(f"unit_classes has {len(self.classes)} entries for {n_units} units")
        seen: dict[tuple[int, int, int], int] = {}
        for ids in unit_ids:
            for key in self._keys(ids):
                for k in key:
                    seen[k] = seen.get(k, 0) + 1
        self.ids: dict[tuple[int, int, int], int] = {}
        for k in sorted(k for k, n in seen.items() if n >= min_count):
            self.ids[k] = n_units * states + len(self.ids)
        self.n_states = n_units * states + len(self.ids)

    def _keys(self, ids: list[int]):
        c = self.classes
        for j, u in enumerate(ids):
            left = int(c[ids[j - 1]]) if j > 0 else self.SILENCE
            right = int(c[ids[j + 1]]) if j + 1 < len(ids) else self.SILENCE
            yield (u, 0, left), (u, 1, right)

    def sequence(self, ids: list[int]) -> torch.Tensor:
        S, out = self.states, []
        for u, (lk, rk) in zip(ids, self._keys(ids)):
            row = [u * S + k for k in range(S)]
            row[0] = self.ids.get(lk, row[0])
            row[-1] = self.ids.get(rk, row[-1])
            out.extend(row)
        return torch.tensor(out, dtype=torch.long)


def train_align(feats: list[torch.Tensor], unit_ids: list[list[int]], n_units: int, cfg: HMMConfig,
                init_counts: list[np.ndarray] | None = None, log=None,
                shard: Shard = SINGLE, ctx: ContextStates | None = None, posterior: bool = False
                ) -> tuple[list[np.ndarray], dict, StateGMMs, list | None]:
    """Viterbi training from ``init_counts`` (frames per unit; None: a flat start), one re-estimation and one
    re-alignment per ``cfg.schedule`` entry. Returns (frames per state per utterance, stats, the model, None or
    with ``posterior`` (and ``cfg.posterior_scale`` > 0) each row's state-boundary posteriors from the last
    re-alignment's scores, ``align_rows``). Under ``shard`` rank 0 re-estimates and shares the model, every
    process aligns its share. ``ctx``: context-dependent edge states (``ContextStates``)."""
    S = cfg.states
    seqs = state_sequences(unit_ids, S, ctx)
    n_states = ctx.n_states if ctx is not None else n_units * S
    model = StateGMMs(n_states, feats[0].shape[1])
    if init_counts is None:
        counts = [np.diff(np.linspace(0, f.shape[0], len(s) + 1).round().astype(np.int64))
                  for f, s in zip(feats, seqs)]
    else:  # frames per unit (or per state already)
        counts = [c if len(c) == len(s) else split_counts(c, S) for c, s in zip(init_counts, seqs)]
    x_all = torch.cat(feats)
    stats = {"passes": [], "frames": int(x_all.shape[0])}
    posts = None
    for p, n_mix in enumerate(cfg.schedule):
        t = time.time()
        if shard.main:
            labels = np.concatenate([np.repeat(s.numpy(), c) for s, c in zip(seqs, counts)])
            model.reestimate(x_all, labels, n_mix, cfg.em_iters)
            stay = np.zeros(n_states)
            visits = np.zeros(n_states)
            for s, c in zip(seqs, counts):
                np.add.at(stay, s.numpy(), np.maximum(c - 1, 0))
                np.add.at(visits, s.numpy(), 1)
            model.log_self = torch.from_numpy(np.log((stay + 1.0) / (stay + visits + 2.0))).float()
        model = shard.broadcast(model)
        scale = cfg.posterior_scale if posterior and p == len(cfg.schedule) - 1 else 0.0
        rows = align_rows(model, feats, seqs, shard=shard, mixture=cfg.mixture_score, posterior_scale=scale,
                          median=cfg.posterior_point == "median")
        new = [c for c, _ in rows]
        if scale > 0:
            posts = [q for _, q in rows]
        moved = float(np.mean([np.abs(np.cumsum(a) - np.cumsum(b)).mean() for a, b in zip(new, counts)]))
        counts = new
        stats["passes"].append({"gaussians": n_mix, "mean_state_boundary_move_frames": round(moved, 3)})
        if log:
            log(f"hmm-gmm pass {p + 1}/{len(cfg.schedule)}: {n_mix} Gaussian(s)/state, state boundaries moved "
                f"{moved:.2f} frames ({time.time() - t:.1f} s)")
    return counts, stats, model, posts


def fit_gaps(model: StateGMMs, feats: list[torch.Tensor], seqs: list[torch.Tensor],
             state_counts: list[np.ndarray], mixture: str = "sum") -> list[float]:
    """Per utterance, how much worse its forced alignment explains its frames than the best state of the whole
    model does, frame by frame: the mean over frames of ``max_s log p(x_t|s) - log p(x_t|aligned state)`` (a
    goodness-of-pronunciation score over the row; a wrong transcript forces frames into states that do not fit)."""
    used = torch.unique(torch.cat(seqs))  # sorted: a row's states are found in it by binary search
    out = []
    for f, s, c in zip(feats, seqs, state_counts):
        scores = model.loglik(f, used, mixture)  # [used states, T]: the best and the aligned state's from one pass
        pos = torch.from_numpy(np.repeat(np.arange(len(s)), c))
        aligned = scores[torch.searchsorted(used, s)[pos], torch.arange(f.shape[0])]
        out.append(round(float((scores.max(0).values - aligned).mean()), 4))
    return out


def features(load_wav, n_utts: int, cfg: HMMConfig) -> tuple[list[torch.Tensor], list[float]]:
    """MFCC features and durations (s) of ``load_wav(i)`` (waveforms at ``cfg.sample_rate``), i < n_utts."""
    fx = MFCC(cfg.sample_rate, cfg.hop_ms, cfg.delta_ms, cfg.win_ms)
    feats, durations = [], []
    for i in range(n_utts):
        w = load_wav(i)
        feats.append(fx(w))
        durations.append(len(w) / cfg.sample_rate)
    return feats, durations


def speech_span(c0: np.ndarray, min_run: int = 3) -> tuple[int, int] | None:
    """[first, last] frame of speech by log energy (``c0``, the 0th cepstrum): frames above a two-means threshold
    between the utterance's quiet and loud frames; the first and last runs of at least ``min_run`` such frames
    bound the speech. None when nothing is loud enough (a flat signal)."""
    x = np.asarray(c0, dtype=np.float64)
    lo, hi = np.percentile(x, 10), np.percentile(x, 90)
    if hi - lo < 1e-6:
        return None
    thr = 0.5 * (lo + hi)
    for _ in range(10):  # two-means (Lloyd) on the 1-D energies
        a, b = x[x <= thr], x[x > thr]
        if not len(a) or not len(b):
            break
        thr = 0.5 * (a.mean() + b.mean())
    loud = np.concatenate([[0], (x > thr).astype(np.int64), [0]])
    d = np.diff(loud)
    starts, ends = np.flatnonzero(d == 1), np.flatnonzero(d == -1)  # runs [start, end)
    keep = (ends - starts) >= min_run
    if not keep.any():
        return None
    return int(starts[keep][0]), int(ends[keep][-1] - 1)


def energy_flat_start(feat: torch.Tensor, units: list[int], silence_ids, states: int,
                      min_share: float = 0.0) -> np.ndarray:
    """Frames per unit for a flat start that knows where the speech is: a leading (trailing) silence unit gets the
    frames before (after) the speech span ``speech_span`` finds on the features' c0, the other units share the rest
    evenly (each unit >= ``states`` frames where possible); an even split when there is no such span, or when what
    lies outside it is less than ``min_share`` of the row."""
    T, U = feat.shape[0], len(units)
    even = np.diff(np.linspace(0, T, U + 1).round().astype(np.int64))
    sil = set(int(s) for s in silence_ids)
    lead, trail = bool(U) and units[0] in sil, U > 1 and units[-1] in sil
    span = speech_span(feat[:, 0].numpy())
    if span is None or not (lead or trail) or 1.0 - (span[1] + 1 - span[0]) / T < min_share:
        return even
    a, b = span[0] if lead else 0, span[1] + 1 if trail else T
    inner = U - lead - trail
    a = min(a, max(0, T - states * (inner + trail)))  # leave room for the other units' states
    b = max(b, min(T, a + states * max(inner, 1)))
    if b <= a or inner <= 0:
        return even
    mid = np.diff(np.linspace(a, b, inner + 1).round().astype(np.int64))
    out = np.concatenate([[a] if lead else [], mid, [T - b] if trail else []]).astype(np.int64)
    return out if out.sum() == T and (out >= 1).all() else even


def hmm_realign(feats: list[torch.Tensor], durations: list[float], unit_ids: list[list[int]],
                init_ends_s: list[np.ndarray] | None, n_units: int, cfg: HMMConfig | None = None,
                log=None, timing: dict | None = None, shard: Shard = SINGLE,
                row_fit: bool = False, keep_sd: bool = False, fit_out: list | None = None
                ) -> tuple[list[np.ndarray | None], dict]:
    """Viterbi-train on ``feats`` (``features()``, at ``cfg.hop_ms``) and re-align: ``unit_ids[i]`` are utterance
    ``i``'s unit class ids (< ``n_units``), ``init_ends_s[i]`` their end times (s) to start from (None: a flat
    start). Returns (unit end times (s) per utterance, None for one with fewer frames than states, stats); the
    wall-clock seconds go to ``timing["seconds"]``. ``row_fit``: ``stats["row_fit"]`` holds each row's fit gap
    under the final model (``fit_gaps``). ``fit_out``: a list that receives the final model (``HMMFit``; none when
    no row could be aligned)."""
    cfg = cfg or HMMConfig()
    t0 = time.time()
    if cfg.flat_init not in FLAT_INITS:
        raise ValueError(f"flat_init must be one of {FLAT_INITS}, got {cfg.flat_init!r}")
    if cfg.posterior_point not in POSTERIOR_POINTS:
        raise ValueError(f"posterior_point must be one of {POSTERIOR_POINTS}, got {cfg.posterior_point!r}")
    if cfg.mixture_score not in MIXTURE_SCORES:
        raise ValueError(f"mixture_score must be one of {MIXTURE_SCORES}, got {cfg.mixture_score!r}")
    split_from = n_units if cfg.split_trailing_silence and cfg.silence_ids else None
    cfg, unit_ids, n_units = _split_trailing(cfg, unit_ids, n_units)
    hop_s, n_utts = cfg.hop_ms / 1000.0, len(feats)
    # Viterbi needs >= one frame per state: an utterance too fast for that keeps its initial alignment
    ok = fits_states(feats, unit_ids, cfg.states)
    stats: dict = {"skipped_too_fast": n_utts - len(ok)}
    out: list[np.ndarray | None] = [None] * n_utts
    if init_ends_s is not None:
        ok = [i for i in ok if init_ends_s[i] is not None]  # rows without a start (an ensemble's earlier round
        stats["skipped_no_start"] = n_utts - stats["skipped_too_fast"] - len(ok)  # skipped them) stay out
    else:
        # a flat start (an even split of each row) is a usable first segmentation of a sentence, not of a long
        # stretch of speech, where it lands far from the phones: it runs on rows up to flat_start_max_s only
        ok = [i for i in ok if durations[i] <= cfg.flat_start_max_s]
        stats["flat_start_skipped_long"] = n_utts - stats["skipped_too_fast"] - len(ok)
    if ok:
        # a seeded sample of at most max_train_hours of audio trains the GMMs; the final model aligns every row
        train, acc = sample_hours(ok, durations, cfg.max_train_hours, cfg.seed)
        if init_ends_s is not None:
            init = [F.ends_to_counts(init_ends_s[i], feats[i].shape[0], hop_s) for i in train]
        elif cfg.flat_init != "even":
            min_share = 0.0 if cfg.flat_init == "vad" else cfg.vad_min_share
            init = [energy_flat_start(feats[i], unit_ids[i], cfg.silence_ids, cfg.states, min_share) for i in train]
        else:
            init = None
        ctx = None
        if cfg.context_min_count > 0:
            if not cfg.unit_classes:
                raise ValueError("context_min_count > 0 needs unit_classes (the context class of every unit)")
            # counted on the rows that train the GMMs: every context state has frames to be estimated from
            ctx = ContextStates([unit_ids[i] for i in train], n_units, cfg.states, cfg.unit_classes,
                                cfg.context_min_count)
            stats["context_states"] = len(ctx.ids)
        train_feats, train_ids = [feats[i] for i in train], [unit_ids[i] for i in train]
        last, mono_passes = cfg, []
        if ctx is not None and 0 < cfg.context_passes < len(cfg.schedule):  # monophones first
            k = cfg.context_passes
            init, st, _, _ = train_align(train_feats, train_ids, n_units,
                                      dataclasses.replace(cfg, schedule=tuple(cfg.schedule[:-k])), init, log, shard)
            last, mono_passes = dataclasses.replace(cfg, schedule=tuple(cfg.schedule[-k:])), st["passes"]
        # posterior_scale > 0: the last pass's scores also give each boundary's posterior (not scored twice)
        counts, st, model, posts = train_align(train_feats, train_ids, n_units, last, init, log, shard, ctx,
                                               posterior=True)
        st["passes"] = mono_passes + st["passes"]
        stats.update(st, train_utts=len(train), train_audio_s=round(acc, 1))
        fit = HMMFit(cfg, n_units, model, ctx, split_from)
        if fit_out is not None:
            fit_out.append(fit)
        rows = train + sorted(set(ok) - set(train))  # the final model aligns the rows it was not trained on
        _finish(fit, feats, durations, rows, unit_ids, counts, posts, out, stats, shard, row_fit, keep_sd)
    if timing is not None:
        timing["seconds"] = round(time.time() - t0, 2)
    return out, stats


def _split_trailing(cfg: HMMConfig, unit_ids: list[list[int]], n_units: int):
    """``cfg.split_trailing_silence``: a row's trailing silence unit becomes class ``n_units`` (its own GMMs);
    returns (the config, unit ids and unit count to train and align with)."""
    if not (cfg.split_trailing_silence and cfg.silence_ids):
        return cfg, unit_ids, n_units
    sil = set(int(x) for x in cfg.silence_ids)
    unit_ids = [list(u[:-1]) + [n_units] if len(u) > 1 and u[-1] in sil else list(u) for u in unit_ids]
    cfg = dataclasses.replace(cfg, silence_ids=(*cfg.silence_ids, n_units), split_trailing_silence=False)
    if cfg.unit_classes:
        cfg = dataclasses.replace(cfg, unit_classes=(*cfg.unit_classes[:n_units], ContextStates.SILENCE))
    return cfg, unit_ids, n_units + 1


def fits_states(feats: list[torch.Tensor], unit_ids: list[list[int]], states: int) -> list[int]:
    """The rows Viterbi can align: at least one frame per state."""
    return [i for i, (f, u) in enumerate(zip(feats, unit_ids)) if f.shape[0] >= states * len(u)]


def _finish(fit: "HMMFit", feats, durations, rows: list[int], unit_ids, counts: list | None, posts: list | None,
            out: list, stats: dict, shard: Shard, row_fit: bool, keep_sd: bool) -> None:
    """Rows ``rows``' unit end times under the final model into ``out`` (and their posterior sds / fit gaps into
    ``stats``). ``counts``/``posts``: the state frame counts (and boundary posteriors) of the first of them, from
    the last training pass; the model aligns the others (all of them when ``counts`` is None: a stored fit)."""
    cfg, model, ctx = fit.cfg, fit.model, fit.ctx
    counts = list(counts or [])
    posts = None if counts and posts is None else list(posts or [])
    rest = rows[len(counts):]
    if rest:
        aligned = align_rows(model, [feats[i] for i in rest],
                             state_sequences([unit_ids[i] for i in rest], cfg.states, ctx), shard=shard,
                             mixture=cfg.mixture_score, posterior_scale=cfg.posterior_scale,
                             median=cfg.posterior_point == "median")
        counts += [c for c, _ in aligned]
        posts = None if posts is None or cfg.posterior_scale <= 0 else posts + [q for _, q in aligned]
    hop_s, n_utts = cfg.hop_ms / 1000.0, len(feats)
    if posts is not None:  # each unit's end at the posterior statistic of the boundary before its successor
        S = cfg.states
        ends = [F.start_frames_to_ends(q[0][S - 1::S], hop_s, durations[i]) for i, q in zip(rows, posts)]
        if keep_sd:  # each end's posterior sd (s); the last unit's end (the audio's) is sure
            stats["boundary_sd"] = [None] * n_utts
            for i, q in zip(rows, posts):
                stats["boundary_sd"][i] = np.append(np.sqrt(q[1][S - 1::S]), 0.0) * hop_s
    else:
        ends = [F.frame_ends_seconds(c.reshape(-1, cfg.states).sum(1), hop_s, durations[i])
                for i, c in zip(rows, counts)]
    for i, e in zip(rows, ends):
        out[i] = e
    if row_fit:  # per row (None where not aligned): common.review's goodness-of-fit statistic
        fits = fit_gaps(model, [feats[i] for i in rows], state_sequences([unit_ids[i] for i in rows], cfg.states,
                                                                          ctx), counts, cfg.mixture_score)
        stats["row_fit"] = [None] * n_utts
        for i, g in zip(rows, fits):
            stats["row_fit"][i] = g


def config_state(cfg: HMMConfig) -> dict:
    """An ``HMMConfig`` as plain types (tuples as lists; the variants' dicts as [key, value] pairs)."""
    d = dataclasses.asdict(cfg)
    d["variants"] = [[list(kv) for kv in dict(v).items()] for v in cfg.variants]
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def config_from_state(d: dict) -> HMMConfig:
    """``config_state``'s inverse."""
    d = dict(d)
    d["variants"] = tuple({k: v for k, v in pairs} for pairs in d["variants"])
    tuples = {f.name for f in dataclasses.fields(HMMConfig) if isinstance(f.default, tuple)} - {"variants"}
    return HMMConfig(**{k: tuple(v) if k in tuples else v for k, v in d.items()})


@dataclass
class HMMFit:
    """One trained HMM-GMM: what aligns new rows as its last training pass aligned its own (``apply_fit``). ``cfg``,
    ``n_units``: after ``_split_trailing``; ``ctx``: its context-dependent edge states (None: monophones);
    ``trailing_class``: the class a row's trailing silence became (``split_trailing_silence``; None: not split)."""
    cfg: HMMConfig
    n_units: int
    model: StateGMMs
    ctx: "ContextStates | None" = None
    trailing_class: int | None = None

    def to_state(self) -> dict:
        """Plain types and tensors (``torch.load(weights_only=True)`` reads them)."""
        m, c = self.model, self.ctx
        return {"cfg": config_state(self.cfg), "n_units": self.n_units, "trailing_class": self.trailing_class,
                "mu": m.mu, "var": m.var, "logw": m.logw, "log_self": m.log_self,
                "ctx": None if c is None else {"states": c.states, "classes": c.classes.tolist(),
                                               "keys": [list(k) for k in c.ids], "ids": list(c.ids.values()),
                                               "n_states": c.n_states}}

    @classmethod
    def from_state(cls, d: dict) -> "HMMFit":
        cfg = config_from_state(d["cfg"])
        model = StateGMMs(d["mu"].shape[0], d["mu"].shape[2])
        model.mu, model.var, model.logw, model.log_self = d["mu"], d["var"], d["logw"], d["log_self"]
        ctx = None
        if d["ctx"] is not None:
            c = d["ctx"]
            ctx = ContextStates.__new__(ContextStates)
            ctx.states, ctx.classes = c["states"], np.asarray(c["classes"], dtype=np.int64)
            ctx.ids = {tuple(k): int(i) for k, i in zip(c["keys"], c["ids"])}
            ctx.n_states = c["n_states"]
        return cls(cfg, d["n_units"], model, ctx, d["trailing_class"])


def apply_fit(fit: HMMFit, feats: list[torch.Tensor], durations: list[float], unit_ids: list[list[int]],
              allowed: set[int] | None = None, shard: Shard = SINGLE, row_fit: bool = False,
              keep_sd: bool = False) -> tuple[list[np.ndarray | None], dict]:
    """``hmm_realign``'s output with a trained model (``HMMFit``) instead of training one: every row it can align
    (>= one frame per state; within ``allowed`` when given) gets the unit end times the final training pass gives
    its own rows."""
    cfg, ids = fit.cfg, unit_ids
    if fit.trailing_class is not None:  # trained with split_trailing_silence: the same split of these rows
        ids = _split_trailing(dataclasses.replace(cfg, silence_ids=cfg.silence_ids[:-1],
                                                  split_trailing_silence=True), unit_ids, fit.trailing_class)[1]
    ok = [i for i in fits_states(feats, ids, cfg.states) if allowed is None or i in allowed]
    out: list[np.ndarray | None] = [None] * len(feats)
    stats: dict = {"aligned": len(ok)}
    if ok:
        _finish(fit, feats, durations, ok, ids, None, None, out, stats, shard, row_fit, keep_sd)
    return out, stats


def mean_ends(sets: list[list[np.ndarray | None]]) -> list[np.ndarray | None]:
    """Per utterance, the mean of the unit end times of the sets that have it (None where none has)."""
    out = []
    for i in range(len(sets[0])):
        have = [s[i] for s in sets if s[i] is not None]
        out.append(np.mean(np.stack(have), axis=0) if have else None)
    return out


def posterior_precision(sd, floor_s: float):
    """A boundary's weight from its posterior sd (s): 1 / (sd^2 + floor^2)."""
    return 1.0 / (sd ** 2 + floor_s ** 2)


def precision_mean_ends(sets, sds, floor_s: float) -> list[np.ndarray | None]:
    """Per utterance and boundary, the members' unit end times weighted by 1 / (posterior sd^2 + floor^2): a
    member whose posterior is sharp at a boundary counts more there."""
    out = []
    for i in range(len(sets[0])):
        have = [(s[i], d[i]) for s, d in zip(sets, sds) if s[i] is not None and d[i] is not None]
        if not have:
            out.append(None)
            continue
        X = np.stack([e for e, _ in have])
        W = posterior_precision(np.stack([d for _, d in have]), floor_s)
        out.append(np.maximum.accumulate((W * X).sum(0) / W.sum(0)))
    return out


class FeatureBank:
    """The MFCC features every ensemble member needs, computed once per distinct (rate, hop, delta, window) from one
    read of each waveform: ``bank.add(wav)`` per utterance in order, ``bank[cfg]`` the list for a config."""

    def __init__(self, configs: list[HMMConfig]):
        self.extractors = {c.feature_key(): MFCC(c.sample_rate, c.hop_ms, c.delta_ms, c.win_ms) for c in configs}
        self.feats: dict[tuple, list[torch.Tensor]] = {k: [] for k in self.extractors}

    def add(self, wav: torch.Tensor) -> None:
        for k, fx in self.extractors.items():
            self.feats[k].append(fx(wav))

    def __getitem__(self, cfg: HMMConfig) -> list[torch.Tensor]:
        return self.feats[cfg.feature_key()]


@dataclass
class Ensemble:
    """What ``hmm_ensemble`` gives: per utterance (None where it was not aligned) the members' mean unit end times
    after the last round (``ends``) and the first member's after the first round (``first``: one plain HMM-GMM
    alignment, before the rounds pull it towards the other members); ``row_fit``, each row's fit gap under the last
    round's first member (``fit_gaps``); ``stats``, per round and member."""
    ends: list
    first: list
    row_fit: list
    stats: dict
    precision: list | None = None  # per row and boundary, the last round's members' mean posterior precision
    first_precision: list | None = None  # ... the first member's in the first round (with posterior_scale > 0)


def hmm_ensemble(bank: FeatureBank, durations: list[float], unit_ids: list[list[int]],
                 init_ends_s: list[np.ndarray] | None, n_units: int, cfg: HMMConfig, later_schedule=None, log=None,
                 timing: dict | None = None, shard: Shard = SINGLE, fit_out: dict | None = None) -> Ensemble:
    """``hmm_realign`` once per member of ``cfg.variant_configs()`` (features from ``bank``), their unit end times
    averaged; ``cfg.rounds`` > 1: every later round re-trains each member from the previous round's mean with
    ``later_schedule`` (default ``cfg.schedule``). Averaging members whose features differ (the MFCC window, the
    delta span, the number of states) cancels part of each one's own boundary error. ``fit_out``: a dict that
    receives what ``apply_ensemble`` needs to give the same result on any rows (``ensemble_state``)."""
    t0 = time.time()
    if cfg.ensemble_weights not in ENSEMBLE_WEIGHTS:
        raise ValueError(f"ensemble_weights must be one of {ENSEMBLE_WEIGHTS}, got {cfg.ensemble_weights!r}")
    if cfg.sd_floor_ms <= 0:
        raise ValueError(f"sd_floor_ms must be > 0, got {cfg.sd_floor_ms}")
    members = cfg.variant_configs()
    floor, first_prec = cfg.sd_floor_ms / 1000.0, None
    rounds = max(1, cfg.rounds)
    stats: dict = {"members": len(members), "rounds": rounds, "runs": []}  # runs: round by round
    init, first, row_fit = init_ends_s, None, None
    ends: list[np.ndarray | None] = [None] * len(durations)
    fits: list = []  # the last round's models (and the first member's first-round model, first)
    for r in range(rounds):
        sets, sds = [], []
        for k, m in enumerate(members):
            if r > 0:
                m = dataclasses.replace(m, schedule=tuple(later_schedule or cfg.schedule))
            last = r == rounds - 1 and k == 0
            got: list = []
            e, st = hmm_realign(bank[m], durations, unit_ids, init, n_units, m, log, None, shard, row_fit=last,
                                keep_sd=True, fit_out=got)
            if (r == 0 and k == 0) or r == rounds - 1:
                fits.append(got[0] if got else None)
            sds.append(st.pop("boundary_sd", None))
            if last:
                row_fit = st.pop("row_fit")
            if r == 0 and k == 0:
                first, first_prec = e, _precisions([sds[0]], floor)
            sets.append(e)
            stats["runs"].append(st)
        ends = _combine(sets, sds, cfg.ensemble_weights, floor)
        init = ends  # a row no member aligned (None) is left out of later rounds
    if timing is not None:
        timing["seconds"] = round(time.time() - t0, 2)
    if fit_out is not None:
        fit_out.update(ensemble_state(cfg, init_ends_s is None, fits[0], fits[-len(members):]))
    return Ensemble(ends, first, row_fit, stats, _precisions(sds, floor), first_prec)


def _combine(sets: list, sds: list, weights: str, floor_s: float) -> list:
    """An ensemble's unit end times from its members' (``sets``, with posterior sds ``sds``): the plain mean, or
    with ``weights`` "precision" (and every member's sds) the precision-weighted one."""
    return mean_ends(sets) if weights == "mean" or None in sds else precision_mean_ends(sets, sds, floor_s)


def ensemble_state(cfg: HMMConfig, flat: bool, first: HMMFit | None, last: list) -> dict:
    """An ensemble's trained models as plain types and tensors: its first member's first-round model, each
    member's last-round model (None where it aligned no row), and what decides which rows they align."""
    return {"rounds": max(1, cfg.rounds), "flat": flat, "ensemble_weights": cfg.ensemble_weights,
            "sd_floor_ms": cfg.sd_floor_ms, "members": [config_state(m) for m in cfg.variant_configs()],
            "first": None if first is None else first.to_state(),
            "last": [None if f is None else f.to_state() for f in last]}


def apply_ensemble(state: dict, bank: FeatureBank, durations: list[float], unit_ids: list[list[int]],
                   shard: Shard = SINGLE, first: bool = True, timing: dict | None = None) -> Ensemble:
    """``hmm_ensemble``'s result from its trained models (``ensemble_state``), on these rows: the rows each member
    aligns follow the same rules (>= one frame per state; a flat start only on rows up to ``flat_start_max_s``;
    a later round only on rows an earlier round aligned), then each member's last-round model aligns them.
    ``first``: also the first member's first-round alignment (``Ensemble.first``; else None); the wall-clock
    seconds go to ``timing["seconds"]``. ``ensemble_jobs`` is the same as independent jobs (one per model)."""
    t0 = time.time()
    jobs, assemble = ensemble_jobs(state, bank, durations, unit_ids, shard, first)
    ens = assemble([job() for job in jobs])
    if timing is not None:
        timing["seconds"] = round(time.time() - t0, 2)
    return ens


def ensemble_jobs(state: dict, bank: FeatureBank, durations: list[float], unit_ids: list[list[int]],
                  shard: Shard = SINGLE, first: bool = True):
    """``apply_ensemble`` as (jobs, assemble): each job aligns the rows with one stored model (independent of the
    others: any thread may run it), ``assemble(their results, in order)`` gives the ``Ensemble``."""
    members = [config_from_state(m) for m in state["members"]]
    floor = state["sd_floor_ms"] / 1000.0
    fit_rows = [set(fits_states(bank[m], unit_ids, m.states)) for m in members]  # >= one frame per state
    # the first round: a flat start only on rows up to flat_start_max_s; a later round: only on the rows an earlier
    # round aligned (any member)
    rows = [{i for i in ok if durations[i] <= m.flat_start_max_s} if state["flat"] else ok
            for m, ok in zip(members, fit_rows)]
    first_rows = rows[0]  # the first member's in the first round
    for _ in range(1, state["rounds"]):
        alive = set().union(*rows)
        rows = [ok & alive for ok in fit_rows]
    jobs, kinds = [], []
    if first and state["first"] is not None:
        fit = HMMFit.from_state(state["first"])
        jobs.append(lambda: apply_fit(fit, bank[members[0]], durations, unit_ids, first_rows, shard, keep_sd=True))
        kinds.append("first")
    for k, (m, fs) in enumerate(zip(members, state["last"])):
        if fs is not None:
            fit_k = HMMFit.from_state(fs)
            jobs.append(lambda f=fit_k, m=m, k=k: apply_fit(f, bank[m], durations, unit_ids, rows[k], shard,
                                                           row_fit=k == 0, keep_sd=True))
            kinds.append(k)

    def assemble(results: list) -> Ensemble:
        got = dict(zip(kinds, results))
        first_ends, first_prec = None, None
        if "first" in got:
            first_ends, st = got["first"]
            first_prec = _precisions([st.get("boundary_sd")], floor)
        sets, sds, row_fit = [], [], [None] * len(durations)
        for k in range(len(members)):
            if k not in got:  # a member that aligned no row in its training
                sets.append([None] * len(durations))
                sds.append(None)
                continue
            e, st = got[k]
            sets.append(e)
            sds.append(st.get("boundary_sd"))
            if k == 0:
                row_fit = st.get("row_fit", row_fit)
        ends = _combine(sets, sds, state["ensemble_weights"], floor)
        stats = {"members": len(members), "rounds": state["rounds"], "applied": True}
        return Ensemble(ends, first_ends, row_fit, stats, _precisions(sds, floor), first_prec)

    return jobs, assemble


def _precisions(sds: list, floor_s: float) -> list | None:
    """Per row, the members' mean posterior precision 1 / (sd^2 + floor^2) at each boundary (None for a row no
    member has); None when a member has no posterior sds (posterior_scale 0)."""
    if any(d is None for d in sds):
        return None
    out = []
    for i in range(len(sds[0])):
        have = [d[i] for d in sds if d[i] is not None]
        out.append(np.mean([posterior_precision(d, floor_s) for d in have], axis=0) if have else None)
    return out
