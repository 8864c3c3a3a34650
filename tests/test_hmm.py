"""HMM-GMM Viterbi training (common/hmm.py): frame bookkeeping, GMM fitting, and alignment of tone "phones"."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from common.frames import ends_to_counts, frame_ends_seconds
from common.hmm import (FLAT_START_SCHEDULE, ContextStates, HMMConfig, StateGMMs, features, hmm_realign,
                        split_counts)
from tests.utils import TONE_FREQS, TONE_SR, mean_inner_error_ms, tone_corpus


def test_ends_to_counts_round_trips_within_half_a_frame():
    rng = np.random.default_rng(0)
    ends = np.sort(rng.uniform(0.0, 2.0, 30))
    ends[-1] = 2.0
    hop, n = 0.01, 201
    c = ends_to_counts(ends, n, hop)
    assert c.sum() == n and np.all(c >= 0)
    back = frame_ends_seconds(c, hop, 2.0)
    assert np.max(np.abs(back[:-1] - ends[:-1])) <= hop / 2 + 1e-9


def test_split_counts_spreads_each_unit_over_its_states():
    assert split_counts([3, 7, 2], 3).tolist() == [1, 1, 1, 2, 3, 2, 1, 0, 1]
    assert split_counts([5, 1], 1).tolist() == [5, 1]


def test_gmm_reestimate_finds_two_clusters_and_keeps_unseen_states():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(400, 2, generator=g) * 0.1 + torch.tensor([2.0, 0.0])
    b = torch.randn(400, 2, generator=g) * 0.1 + torch.tensor([-2.0, -1.0])  # apart along the split direction
    x = torch.cat([a, b])
    m = StateGMMs(2, 2)
    labels = np.zeros(len(x), dtype=np.int64)  # state 1 has no frames
    m.reestimate(x, labels, 1, 3)
    m.reestimate(x, labels, 2, 10)
    means = sorted(m.mu[0].tolist())
    assert np.allclose(means, [[-2.0, -1.0], [2.0, 0.0]], atol=0.05), means
    assert torch.allclose(m.logw[0].exp().sum(), torch.tensor(1.0), atol=1e-4)
    assert torch.equal(m.mu[1, 0], torch.zeros(2)) and m.logw[1, 1] < -1e3  # unseen: its old single Gaussian
    ll = m.loglik(x[:3], torch.tensor([0, 1]))
    assert ll.shape == (2, 3) and torch.isfinite(ll).all() and (ll[0] > ll[1]).all()


def _reference_reestimate(mu, var, logw, x, labels, n_mix, em_iters, floor):
    """The per-state loop ``StateGMMs.reestimate`` batches (float64): split the heaviest Gaussian while the state
    has >= 4 frames per Gaussian, then EM; a state with < 2 frames keeps its first Gaussians."""
    S, _, D = mu.shape
    out = (torch.zeros(S, n_mix, D, dtype=x.dtype), torch.ones(S, n_mix, D, dtype=x.dtype),
           torch.full((S, n_mix), -1e4, dtype=x.dtype))
    for s in range(S):
        live = logw[s] > -1e3
        m, v, w = mu[s][live].clone(), var[s][live].clone(), logw[s][live].clone()
        xs = x[torch.from_numpy(labels == s)]
        if len(xs) >= 2:
            while len(m) < n_mix and len(xs) >= 4 * (len(m) + 1):
                k = int(torch.argmax(w))
                eps = 0.2 * v[k].sqrt()
                m, v, w = torch.cat([m, (m[k] + eps)[None]]), torch.cat([v, v[k][None]]), torch.cat([w, w[k][None]])
                m[k] = m[k] - eps
                w[k] = w[-1] = w[k] - np.log(2.0)
            for _ in range(em_iters):
                dens = torch.distributions.Normal(m[None], v[None].sqrt()).log_prob(xs[:, None]).sum(-1) + w[None]
                r = torch.softmax(dens, 1)
                n = r.sum(0) + 1e-6
                m = (r.t() @ xs) / n[:, None]
                v = ((r.t() @ (xs * xs)) / n[:, None] - m ** 2).clamp_min(floor)
                w = torch.log(n / n.sum())
        k = min(len(m), n_mix)
        out[0][s, :k], out[1][s, :k], out[2][s, :k] = m[:k], v[:k], w[:k]
    return out


def test_batched_reestimate_and_loglik_match_the_per_state_reference():
    """The batched EM (all states at once, grouped by frame count) is the per-state algorithm: the same splits and
    the same fits, in float64 to 1e-9; the scores are the mixtures' log densities, log-sum or best Gaussian."""
    from common.hmm import VAR_FLOOR
    torch.set_default_dtype(torch.float64)
    try:
        rng = np.random.default_rng(3)
        S, D = 9, 4
        counts = [0, 1, 3, 7, 20, 60, 150, 400, 900]  # unseen, too few for EM, too few to split, ... many
        labels = np.concatenate([np.full(c, s) for s, c in enumerate(counts)])
        x = torch.from_numpy(rng.normal(size=(len(labels), D)) * (1 + labels[:, None] % 3)
                             + labels[:, None] * 0.5 + rng.choice([-2.0, 2.0], size=(len(labels), 1)))
        m = StateGMMs(S, D)
        ref = (m.mu.clone(), m.var.clone(), m.logw.clone())
        for n_mix in (1, 2, 4, 8, 8):
            m.reestimate(x, labels, n_mix, 3)
            ref = _reference_reestimate(*ref, x, labels, n_mix, 3, VAR_FLOOR)
            width = m.mu.shape[1]
            assert width <= n_mix and bool((ref[2][:, width:] < -1e3).all())
            for got, want in zip((m.mu, m.var, m.logw), ref):
                assert torch.allclose(got, want[:, :width], atol=1e-9), (n_mix, (got - want[:, :width]).abs().max())
        assert (m.logw > -1e3).sum(1).tolist() == [1, 1, 1, 1, 5, 8, 8, 8, 8]
        states = torch.tensor([8, 4, 0, 8])
        live = m.logw[states] > -1e3
        dens = torch.distributions.Normal(m.mu[states][None], m.var[states][None].sqrt()).log_prob(
            x[:50, None, None]).sum(-1) + m.logw[states][None]
        dens = dens.masked_fill(~live[None], -torch.inf)
        assert torch.allclose(m.loglik(x[:50], states), torch.logsumexp(dens, -1).t(), atol=1e-9)
        assert torch.allclose(m.loglik(x[:50], states, "max"), dens.amax(-1).t(), atol=1e-9)
    finally:
        torch.set_default_dtype(torch.float32)


def _tones_from_a_noisy_start():
    """The tone corpus, its MFCCs, and a start that is right on average but +-30 ms off at each boundary (in
    export: the neural refiner's alignment)."""
    wavs, units, true_ends = tone_corpus(30, seed=5)
    cfg = HMMConfig(sample_rate=TONE_SR)
    feats, durs = features(lambda i: wavs[i], len(wavs), cfg)
    rng = np.random.default_rng(1)
    start = [np.concatenate([e[:-1] + rng.uniform(-0.03, 0.03, len(e) - 1), e[-1:]]) for e in true_ends]
    return wavs, units, true_ends, cfg, feats, durs, start


def test_hmm_sharpens_noisy_boundaries_and_aligns_from_a_flat_start():
    wavs, units, true_ends, cfg, feats, durs, start = _tones_from_a_noisy_start()
    assert feats[0].shape == (1 + len(wavs[0]) // 160, 39) and abs(durs[0] - len(wavs[0]) / TONE_SR) < 1e-9
    before = mean_inner_error_ms(start, true_ends)
    ends, stats = hmm_realign(feats, durs, units, start, len(TONE_FREQS) + 1, cfg)
    after = mean_inner_error_ms(ends, true_ends)
    assert before > 12 and after < 9, (before, after)  # measured 15.4 -> 6.8 ms
    assert len(stats["passes"]) == len(cfg.schedule) and stats["skipped_too_fast"] == 0
    assert all(len(e) == len(u) and abs(e[-1] - d) < 1e-9 and np.all(np.diff(e) > 0)
               for e, u, d in zip(ends, units, durs))
    # from a flat start (equal frames per state): no information about the boundaries at all
    flat = [np.linspace(0, d, len(u) + 1)[1:] for d, u in zip(durs, units)]
    ends, _ = hmm_realign(feats, durs, units, None, len(TONE_FREQS) + 1,
                          HMMConfig(sample_rate=TONE_SR, schedule=FLAT_START_SCHEDULE))
    assert mean_inner_error_ms(flat, true_ends) > 25 and mean_inner_error_ms(ends, true_ends) < 12  # measured 8.3


def test_max_mixture_score_bounds_the_sum_and_aligns_as_well():
    # per frame and state: best Gaussian <= mixture density <= best Gaussian x M (the Viterbi approximation)
    g = torch.Generator().manual_seed(3)
    m = StateGMMs(3, 4)
    m.mu, m.var = torch.randn(3, 4, 4, generator=g), torch.rand(3, 4, 4, generator=g) + 0.5
    m.logw = torch.log_softmax(torch.randn(3, 4, generator=g), -1)
    x = torch.randn(50, 4, generator=g)
    s, mx = m.loglik(x, torch.tensor([0, 2, 1])), m.loglik(x, torch.tensor([0, 2, 1]), "max")
    assert (mx <= s + 1e-5).all() and (mx >= s - np.log(4) - 1e-5).all() and (s - mx).max() > 0.01
    # the tone corpus from a noisy start, both ways: the same boundaries within a frame on average
    _, units, true_ends, cfg, feats, durs, start = _tones_from_a_noisy_start()
    exact, _ = hmm_realign(feats, durs, units, start, len(TONE_FREQS) + 1, cfg)
    fast, _ = hmm_realign(feats, durs, units, start, len(TONE_FREQS) + 1,
                          dataclasses.replace(cfg, mixture_score="max"))
    assert mean_inner_error_ms(fast, true_ends) < 9, mean_inner_error_ms(fast, true_ends)
    assert mean_inner_error_ms(fast, exact) < 2, mean_inner_error_ms(fast, exact)  # measured 0.0
    with pytest.raises(ValueError, match="mixture_score"):
        hmm_realign(feats, durs, units, start, len(TONE_FREQS) + 1, dataclasses.replace(cfg, mixture_score="avg"))


def test_context_states_split_edge_states_by_the_neighbours_class():
    # classes: unit 0 silence (1), unit 1 class 2, unit 2 class 3; three states per unit
    rows = [[0, 1, 2, 0], [0, 2, 1, 0]]
    ctx = ContextStates(rows, 3, 3, (ContextStates.SILENCE, 2, 3), min_count=2)
    # seen twice: unit 0's first state after the row's start (silence) and its last state before the row's end
    assert ctx.ids == {(0, 0, ContextStates.SILENCE): 9, (0, 1, ContextStates.SILENCE): 10} and ctx.n_states == 11
    assert ctx.sequence(rows[0]).tolist() == [9, 1, 2, 3, 4, 5, 6, 7, 8, 0, 1, 10]
    every = ContextStates(rows, 3, 3, (ContextStates.SILENCE, 2, 3), min_count=1)
    assert len(every.ids) == 14 and every.n_states == 23  # the 16 edges' (unit, side, class): two seen twice
    seq = every.sequence(rows[1]).tolist()
    assert seq[1::3] == [1, 7, 4, 1] and all(s >= 9 for k, s in enumerate(seq) if k % 3 != 1)  # middles context-free
    with pytest.raises(ValueError, match="unit_classes has 2 entries for 3 units"):
        ContextStates(rows, 3, 3, (1, 2), min_count=1)


def test_context_dependent_edges_train_after_monophones_and_need_classes():
    """The context-dependent ensemble member (``context_min_count``): edge states of its own for each neighbouring
    class. Trained from the start, a tone's first state learns its left neighbour's tone wherever the start put
    those frames in it, and keeps them (flat start: 7.1 -> 10.7 ms); trained after monophone passes
    (``context_passes``, as MFA's triphones start from its monophone alignment) it aligns as the monophones do."""
    from tests.utils import tone_words

    wavs, units, true_ends = tone_words(30, seed=4)
    classes = (ContextStates.SILENCE, 2, 3, 4, 5, 6)  # every tone its own class
    cfg = HMMConfig(sample_rate=TONE_SR, silence_ids=(0,), flat_init="vad", schedule=FLAT_START_SCHEDULE,
                    split_trailing_silence=True)
    feats, durs = features(lambda i: wavs[i], len(wavs), cfg)
    err = {}
    for name, passes in (("mono", None), ("ctx_throughout", 0), ("ctx_after_mono", 2)):
        c = cfg if passes is None else dataclasses.replace(cfg, context_min_count=5, unit_classes=classes,
                                                          context_passes=passes)
        ends, stats = hmm_realign(feats, durs, units, None, len(TONE_FREQS) + 1, c)
        assert all(len(e) == len(u) for e, u in zip(ends, units)) and len(stats["passes"]) == 12
        assert (passes is None) == ("context_states" not in stats) and stats.get("context_states", 11) > 10
        err[name] = mean_inner_error_ms(ends, true_ends)
    assert err["mono"] < 9 and err["ctx_throughout"] > err["mono"] + 2, err  # measured 7.1, 10.7
    assert err["ctx_after_mono"] < err["mono"] + 0.5, err  # measured 7.1
    with pytest.raises(ValueError, match="needs unit_classes"):
        hmm_realign(feats, durs, units, None, len(TONE_FREQS) + 1, dataclasses.replace(cfg, context_min_count=5))


def test_utterance_too_fast_for_three_states_keeps_its_start():
    wavs, units, true_ends = tone_corpus(6, seed=6)
    cfg = HMMConfig(sample_rate=TONE_SR, schedule=(1, 1))
    feats, durs = features(lambda i: wavs[i], len(wavs), cfg)
    units[0] = units[0] * 20  # far more units than 10 ms frames / 3
    ends, stats = hmm_realign(feats, durs, units, None, len(TONE_FREQS) + 1, cfg)
    assert ends[0] is None and all(e is not None for e in ends[1:]) and stats["skipped_too_fast"] == 1


def test_training_on_a_sample_still_aligns_every_row():
    wavs, units, true_ends = tone_corpus(12, seed=7)
    cfg = HMMConfig(sample_rate=TONE_SR, schedule=FLAT_START_SCHEDULE, max_train_hours=3.0 / 3600)  # ~3 s of audio
    feats, durs = features(lambda i: wavs[i], len(wavs), cfg)
    ends, stats = hmm_realign(feats, durs, units, None, len(TONE_FREQS) + 1, cfg)
    assert 1 <= stats["train_utts"] < len(wavs) and all(e is not None and len(e) == len(u) for e, u in zip(ends, units))
    assert mean_inner_error_ms(ends, true_ends) < 15  # rows never trained on are aligned by the final model


def test_energy_flat_start_keeps_phones_out_of_long_edge_silences():
    """Single words with ~50 % edge silence (as VoxAngeles): an even flat start trains the last phones' states on
    the trailing silence and every boundary comes out late; the energy-informed start does not."""
    from tests.utils import tone_words

    wavs, units, true_ends = tone_words(30, seed=3)
    got = {}
    for init in ("even", "vad"):
        cfg = HMMConfig(sample_rate=TONE_SR, schedule=FLAT_START_SCHEDULE, flat_init=init, silence_ids=(0,))
        feats, durs = features(lambda i: wavs[i], len(wavs), cfg)
        ends, _ = hmm_realign(feats, durs, units, None, len(TONE_FREQS) + 1, cfg)
        signed = 1000 * float(np.mean(np.concatenate([a[:-1] - b[:-1] for a, b in zip(ends, true_ends)])))
        got[init] = (mean_inner_error_ms(ends, true_ends), signed)
    assert got["even"][1] > 30 and got["vad"][0] < 12 and abs(got["vad"][1]) < 5, got  # measured 53 / +53, 7.6 / -1
    # a split trailing-silence model changes the classes, not the result's shape
    cfg = HMMConfig(sample_rate=TONE_SR, schedule=(1, 2), flat_init="vad", silence_ids=(0,),
                    split_trailing_silence=True)
    feats, durs = features(lambda i: wavs[i], len(wavs), cfg)
    ends, _ = hmm_realign(feats, durs, units, None, len(TONE_FREQS) + 1, cfg)
    assert all(len(e) == len(u) for e, u in zip(ends, units)) and mean_inner_error_ms(ends, true_ends) < 12


def test_ensemble_and_flat_start_pull_a_late_first_pass_back_to_the_sound_change():
    """The export's HMM-GMM refinement without the frame classifier (refine_rounds 0): an ensemble of HMM-GMMs
    whose MFCCs differ (window, delta span) re-trained from the first pass, fused with one from an energy-informed
    flat start. A first pass 25 ms late at every boundary comes back to the tone changes."""
    from common.hmm import FeatureBank, hmm_ensemble
    from common.refine import RefineConfig, refine_boundaries
    from tests.utils import tone_words

    wavs, units, true_ends = tone_words(30, seed=4)
    durs = [len(w) / TONE_SR for w in wavs]
    late = [np.r_[e[:-1] + 0.025, e[-1]] for e in true_ends]

    def signed_ms(ends):
        return 1000 * float(np.mean(np.concatenate([a[:-1] - b[:-1] for a, b in zip(ends, true_ends)])))

    variants = ({"win_ms": 25.0, "states": 4}, {"win_ms": 15.0, "states": 4},
                {"win_ms": 20.0, "delta_ms": 10.0, "states": 4})
    cfg = HMMConfig(sample_rate=TONE_SR, silence_ids=(0,), variants=variants, rounds=2, flat_init="vad",
                    split_trailing_silence=True)
    bank = FeatureBank(cfg.variant_configs())
    for w in wavs:
        bank.add(w)
    assert len(bank.feats) == 3 and bank[cfg.variant_configs()[1]][0].shape[1] == 39
    one = hmm_ensemble(bank, durs, units, late, len(TONE_FREQS) + 1, dataclasses.replace(cfg, variants=(), rounds=1))
    ens = hmm_ensemble(bank, durs, units, late, len(TONE_FREQS) + 1, cfg)
    assert ens.stats["members"] == 3 and len(ens.stats["runs"]) == 6 and len(ens.row_fit) == len(wavs)
    assert all(np.array_equal(a, b) for a, b in zip(one.ends, one.first))  # one member, one round: the same
    assert signed_ms(ens.ends) < signed_ms(one.ends) - 3  # the second round moves further back (19.5 -> 14.8 ms)
    ends, grid, confs, stats, named = refine_boundaries(
        lambda i: wavs[i], durs, units, late, len(TONE_FREQS) + 1, RefineConfig(rounds=0, sample_rate=TONE_SR),
        cfg, 1.0, hmm_init="first_pass", flat_single=True)
    assert grid == 0.001 and confs == [None] * len(wavs) and "rounds" not in stats
    assert set(named) == {"first_pass", "hmm_from_first_pass", "hmm_flat_start", "hmm_flat_start_single"}
    assert len(stats["row_fit"]) == len(wavs) and all(f >= 0 for f in stats["row_fit"])
    assert mean_inner_error_ms(late, true_ends) == pytest.approx(25.0)
    assert mean_inner_error_ms(ends, true_ends) < 11 and abs(signed_ms(ends)) < 11  # measured 7.8 / +7.8 ms
    assert abs(signed_ms(named["hmm_flat_start"])) < 4  # the flat start knows nothing of the late start
    # the export's defaults: posterior medians, precision-weighted ensembles and HMM-GMM members in the fusion
    post = dataclasses.replace(cfg, posterior_scale=0.1, ensemble_weights="precision")
    ends_p, *_ = refine_boundaries(
        lambda i: wavs[i], durs, units, late, len(TONE_FREQS) + 1, RefineConfig(rounds=0, sample_rate=TONE_SR),
        post, 1.0, hmm_init="first_pass", flat_single=True, fusion_precision=True)
    assert mean_inner_error_ms(ends_p, true_ends) < 11 and abs(signed_ms(ends_p)) < 11
    assert not all(np.allclose(a, b) for a, b in zip(ends_p, ends))
    # ... and the boundary detector, on features of its own (no classifier to share them): one more member
    from common.boundary_detector import DetectorConfig

    names = ["pau", "a", "t", "s", "n", "l"]  # the tones read as manner classes (silence, vowel, stop, ...)
    ends_d, _, _, stats_d, named_d = refine_boundaries(
        lambda i: wavs[i], durs, units, late, len(TONE_FREQS) + 1, RefineConfig(rounds=0, sample_rate=TONE_SR),
        post, 1.0, hmm_init="first_pass", flat_single=True, fusion_precision=True, class_names=names,
        detector=DetectorConfig(epochs=3, channels=16))
    assert "detector" in named_d and stats_d["detector"]["epochs"] == 3
    assert all(len(d) == len(u) and d[-1] == pytest.approx(t) for d, u, t in zip(named_d["detector"], units, durs))
    assert mean_inner_error_ms(ends_d, true_ends) < 11 and abs(signed_ms(ends_d)) < 11
    with pytest.raises(ValueError, match="detector needs the token name"):
        refine_boundaries(lambda i: wavs[i], durs, units, late, len(TONE_FREQS) + 1,
                          RefineConfig(rounds=0, sample_rate=TONE_SR), post, 1.0, detector=DetectorConfig())


def test_hmm_gmms_train_beside_the_classifier_with_the_results_of_one_after_the_other():
    """hmm_concurrent: the HMM-GMMs that do not start from the classifier train in worker threads while it
    trains. On one thread per job (as here, and as every job gets on 2 cores) every member is exactly what the
    jobs give one after the other; the thread counts come back; a job's error reaches the caller."""
    from common.refine import RefineConfig, refine_boundaries
    from tests.utils import tone_words

    wavs, units, true_ends = tone_words(24, seed=5)
    durs = [len(w) / TONE_SR for w in wavs]
    late = [np.r_[e[:-1] + 0.02, e[-1]] for e in true_ends]
    cfg = HMMConfig(sample_rate=TONE_SR, silence_ids=(0,), variants=({"win_ms": 25.0}, {"win_ms": 15.0}),
                    rounds=2, posterior_scale=0.1, ensemble_weights="precision")
    ref = RefineConfig(rounds=2, epochs=2, epochs_later=1, channels=16, sample_rate=TONE_SR)

    def run(concurrent: bool, hmm=cfg):
        timing: dict = {}
        out = refine_boundaries(lambda i: wavs[i], durs, units, late, len(TONE_FREQS) + 1, ref, hmm, 0.5,
                                [1, 2], hmm_init="first_pass", flat_single=True, fusion_precision=True,
                                timing=timing, concurrent=concurrent)
        return out, timing

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        (ends_a, _, _, _, named_a), timing_a = run(False)
        (ends_b, _, _, _, named_b), timing_b = run(True)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    assert "hmm_workers" not in timing_a and timing_b["hmm_workers"] == 1
    assert timing_b["hmm_flat_start_s"] > 0 and timing_b["hmm_from_first_pass_s"] > 0
    assert set(named_a) == set(named_b) >= {"classifier", "hmm_from_first_pass", "hmm_flat_start", "first_pass"}
    for name in named_a:
        assert all(np.array_equal(a, b) for a, b in zip(named_a[name], named_b[name])), name
    assert all(np.array_equal(a, b) for a, b in zip(ends_a, ends_b))
    assert not all(np.allclose(a, b) for a, b in zip(named_b["hmm_flat_start"], late))  # they did align
    with pytest.raises(ValueError, match="ensemble_weights must be one of"):  # raised in a worker thread
        run(True, dataclasses.replace(cfg, ensemble_weights="median"))
    assert torch.get_num_threads() == before


def test_boundary_posterior_means_match_enumeration_and_tend_to_the_viterbi_path():
    import itertools

    from common.hmm import _boundary_posterior_means_np, boundary_posterior_means
    from common.mas import mas_frames

    rng = np.random.default_rng(0)
    S, T = 3, 7
    v = rng.normal(size=(S, T))
    mass = np.zeros((S - 1, T))  # mass[s, t]: P(state s + 1 begins at frame t)
    for starts in itertools.combinations(range(1, T), S - 1):  # every monotonic path: where states 1.. begin
        edges = (0, *starts, T)
        w = np.exp(sum(v[s, edges[s]:edges[s + 1]].sum() for s in range(S)))
        mass[np.arange(S - 1), list(starts)] += w
    mass /= mass.sum(1, keepdims=True)
    assert np.allclose(boundary_posterior_means(v), (mass * np.arange(T)).sum(1), atol=1e-9)
    cum = np.cumsum(mass, 1)  # the median, each frame's mass spread over +-half a frame
    k = (cum < 0.5).sum(1)
    med = k - 0.5 + (0.5 - cum[np.arange(S - 1), k - 1]) / mass[np.arange(S - 1), k]
    assert np.allclose(boundary_posterior_means(v, median=True), med, atol=1e-9)
    big = rng.normal(size=(20, 90)) * 3
    for median in (False, True):  # the numba kernel and its numpy twin
        assert np.allclose(boundary_posterior_means(big, median), _boundary_posterior_means_np(big, median),
                           atol=1e-8)
    # sharp scores: the posterior mass sits on the best path
    viterbi_starts = np.cumsum(mas_frames([torch.tensor(big * 50, dtype=torch.float32)], [90])[0])[:-1]
    assert np.allclose(boundary_posterior_means(big * 50), viterbi_starts, atol=0.05)


def test_posterior_mean_boundaries_beat_the_viterbi_frame_grid_on_tones():
    _, units, true_ends, cfg, feats, durs, start = _tones_from_a_noisy_start()
    best, _ = hmm_realign(feats, durs, units, start, len(TONE_FREQS) + 1, cfg)
    viterbi = mean_inner_error_ms(best, true_ends)
    # measured 5.72 ms (Viterbi, on the 10 ms frame grid) -> 5.46 (the export's scale 0.1, median), 5.37 (0.1,
    # mean), 5.05 (0.03, median)
    for scale, point, gain in ((0.1, "median", 0.2), (0.1, "mean", 0.2), (0.03, "median", 0.5)):
        post, _ = hmm_realign(feats, durs, units, start, len(TONE_FREQS) + 1,
                              dataclasses.replace(cfg, posterior_scale=scale, posterior_point=point))
        assert mean_inner_error_ms(post, true_ends) < viterbi - gain, (scale, point)
    assert all(len(e) == len(u) and abs(e[-1] - d) < 1e-9 and np.all(np.diff(e) > 0)
               for e, u, d in zip(post, units, durs))
    with pytest.raises(ValueError, match="posterior_point"):
        hmm_realign(feats, durs, units, start, len(TONE_FREQS) + 1,
                    dataclasses.replace(cfg, posterior_scale=0.1, posterior_point="mode"))
    frac = np.concatenate([e[:-1] / 0.01 % 1.0 for e in post])
    assert np.mean(np.abs(frac - 0.5) > 0.01) > 0.5  # off the frame grid (Viterbi ends sit half a frame before one)


def test_precision_weighted_ensemble_trusts_the_sure_member_boundary_by_boundary():
    from common.hmm import FeatureBank, hmm_ensemble, precision_mean_ends

    # two members of one row: the first sure of boundary 0 (sd 1 ms), the second sure of boundary 1
    a, b = np.array([0.100, 0.300, 0.5]), np.array([0.140, 0.260, 0.5])
    sa, sb = np.array([0.001, 0.030, 0.0]), np.array([0.030, 0.001, 0.0])
    (ends,) = precision_mean_ends([[a], [b]], [[sa], [sb]], 0.005)
    w_sure, w_unsure = 1 / (0.001 ** 2 + 0.005 ** 2), 1 / (0.030 ** 2 + 0.005 ** 2)
    assert ends[0] == pytest.approx((w_sure * 0.100 + w_unsure * 0.140) / (w_sure + w_unsure))
    assert ends[0] < 0.102 and ends[1] < 0.262 and ends[2] == 0.5
    assert precision_mean_ends([[None], [b]], [[None], [sb]], 0.005)[0] is not None  # a member without the row
    # the export's ensemble on tone words: posterior sds reach the average, and the result stays a tiling
    from tests.utils import tone_words

    wavs, units, true_ends = tone_words(12, seed=4)
    durs = [len(w) / TONE_SR for w in wavs]
    late = [np.r_[e[:-1] + 0.02, e[-1]] for e in true_ends]
    cfg = HMMConfig(sample_rate=TONE_SR, silence_ids=(0,), variants=({"win_ms": 25.0}, {"win_ms": 15.0}),
                    posterior_scale=0.1)
    bank = FeatureBank(cfg.variant_configs())
    for w in wavs:
        bank.add(w)
    plain = hmm_ensemble(bank, durs, units, late, len(TONE_FREQS) + 1, cfg)
    prec = hmm_ensemble(bank, durs, units, late, len(TONE_FREQS) + 1,
                        dataclasses.replace(cfg, ensemble_weights="precision"))
    assert all(np.all(np.diff(e) > 0) and e[-1] == pytest.approx(d) for e, d in zip(prec.ends, durs))
    moved = np.concatenate([p[:-1] - q[:-1] for p, q in zip(prec.ends, plain.ends)])
    assert np.abs(moved).max() > 1e-4  # the weights differ from the plain mean somewhere
    assert "boundary_sd" not in prec.stats["runs"][0]  # used, not reported
    for bad in ({"ensemble_weights": "vote"}, {"sd_floor_ms": 0.0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            hmm_ensemble(bank, durs, units, late, len(TONE_FREQS) + 1, dataclasses.replace(cfg, **bad))


@pytest.mark.parametrize("hmm_init", ["first_pass", "classifier"])
def test_a_stored_refiner_gives_the_boundaries_of_its_training_and_aligns_new_rows(hmm_init):
    """refine_boundaries' fit_out -> torch.save -> torch.load(weights_only) -> fitted: nothing is trained, and on
    the rows it was trained on every member and the fused boundaries are exactly those of the training (the
    classifier, both HMM-GMM ensembles with context states, tied units and a split trailing silence, the flat
    start's single member, the boundary detector). On rows it never saw it aligns as well as on its own; a
    flat start's length rule still holds."""
    import io

    from common.boundary_detector import DetectorConfig
    from common.refine import RefineConfig, refine_boundaries
    from tests.utils import tone_words

    wavs, units, true_ends = tone_words(30, seed=5)
    durs = [len(w) / TONE_SR for w in wavs]
    late = [np.r_[e[:-1] + 0.02, e[-1]] for e in true_ends]
    cfg = HMMConfig(sample_rate=TONE_SR, silence_ids=(0,), rounds=2, posterior_scale=0.1, tie_min_count=3,
                    ensemble_weights="precision", split_trailing_silence=True, flat_start_max_s=1.2,
                    variants=({"win_ms": 25.0}, {"win_ms": 15.0, "context_min_count": 3}))
    ref = RefineConfig(rounds=3, epochs=8, epochs_later=4, channels=32, sample_rate=TONE_SR)
    kw = dict(hmm_init=hmm_init, flat_single=True, fusion_precision=True, fusion="gated",
              class_names=["pau", "a", "t", "s", "n", "l"], detector=DetectorConfig(epochs=2, channels=16))
    seen, new = list(range(22)), list(range(22, 30))

    def refine(rows, **more):
        return refine_boundaries(lambda i: wavs[rows[i]], [durs[i] for i in rows], [units[i] for i in rows],
                                 [late[i] for i in rows], len(TONE_FREQS) + 1, ref, cfg, 0.5, [1, 2], **kw, **more)

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)  # the thread counts of a training: the same float sums
        fit: dict = {}
        ends, _, confs, stats, named = refine(seen, fit_out=fit)
        assert set(fit) == {"classifier", "hmm", "detector", "classes"} and fit["hmm"]["tied"] is not None
        assert fit["classes"] == [1, 2, 3, 4, 5, 6]  # the manner classes: no phonology table to read again
        buf = io.BytesIO()
        torch.save(fit, buf)
        buf.seek(0)
        stored = torch.load(buf, weights_only=True)
        timing: dict = {}
        ends_s, _, confs_s, stats_s, named_s = refine(seen, fitted=stored, timing=timing)
        assert "rounds" not in stats_s and stats_s["applied"] and stats_s["detector"]["epochs"] == 0
        assert set(named_s) == set(named) and len(named) == 6
        for k in named:
            assert all(np.array_equal(a, b) for a, b in zip(named[k], named_s[k])), k
        assert all(np.array_equal(a, b) for a, b in zip(ends, ends_s))
        assert all(np.allclose(a, b) for a, b in zip(confs, confs_s)) and stats["row_fit"] == stats_s["row_fit"]
        # rows it never saw: aligned about as well as its own, better than the 20 ms late first pass
        fresh, *_, named_n = refine(new, fitted=stored)
    finally:
        torch.set_num_threads(before)
    own = mean_inner_error_ms(ends, [true_ends[i] for i in seen])
    got = mean_inner_error_ms(fresh, [true_ends[i] for i in new])
    assert got < min(18.0, 1.5 * own), (own, got)  # measured 13.5 / 16.2 and 12.6 / 13.3 ms
    longer = [k for k, i in enumerate(new) if durs[i] > cfg.flat_start_max_s]  # no flat start on these
    assert longer and all(named_n["hmm_flat_start"][k] is None for k in longer)
    with pytest.raises(ValueError, match="need a refiner fitted here"):
        refine(seen, fitted=stored, fixed_ends_s={0: true_ends[0]})
    # without the classifier (refine_rounds 0: the HMM-GMMs start from the first pass) the same holds
    kw.update(detector=None)
    ref = dataclasses.replace(ref, rounds=0)
    fit = {}
    ends = refine(seen, fit_out=fit)[0]
    assert set(fit) == {"hmm", "classes"}
    assert all(np.array_equal(a, b) for a, b in zip(ends, refine(seen, fitted=fit)[0]))
    with pytest.raises(ValueError, match="no frame classifier"):
        ref = dataclasses.replace(ref, rounds=1)
        refine(seen, fitted=fit)
