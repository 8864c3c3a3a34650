"""common/train_aids.py: AuxiliaryASR's training aids (input and loss aids) and the best_joint score's terms."""
from __future__ import annotations

import math
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common import train_aids as AIDS  # noqa: E402
from common.vocab import BLANK_ID, BOS_ID, UNK_ID  # noqa: E402


def test_vtlp_identity_at_one_and_a_stretch_otherwise():
    torch.manual_seed(0)
    feats = torch.randn(2, 7, 80)
    assert torch.allclose(AIDS.vtlp(feats, 1.0, 1.0), feats)
    ramp = torch.arange(80.0).expand(1, 3, 80)  # bin f holds f: the warped bin f reads f * alpha
    out = AIDS.vtlp(ramp, 0.9, 0.9)
    assert torch.allclose(out[0, 0, :10], torch.arange(10.0) * 0.9, atol=1e-5)
    top = AIDS.vtlp(ramp, 1.1, 1.1)
    assert top[0, 0, 79] == 79 and top[0, 0, 10] == pytest.approx(11.0)  # clamped at the top bin


def test_frame_dropout_and_adaptive_masks_follow_their_sizes():
    torch.manual_seed(0)
    feats = torch.ones(4, 200, 80)
    dropped = AIDS.frame_dropout(feats, 0.05)
    frames_zero = (dropped.abs().sum(-1) == 0).float().mean().item()
    assert 0.02 < frames_zero < 0.09
    assert torch.equal(AIDS.frame_dropout(feats, 0.0), feats)
    hp = SimpleNamespace(num_time_masks=2, num_freq_masks=2, time_mask_param=50, freq_mask_param=13,
                         max_time_mask_ratio=0.15, max_freq_mask_ratio=0.2)
    lens = torch.tensor([1.0, 0.1, 1.0, 0.05])  # rows of 200, 20, 200 and 10 frames
    for _ in range(20):
        out = AIDS.adaptive_masks(feats, lens, hp)
        for b, frames in enumerate([200, 20, 200, 10]):
            masked_t = int((out[b, :frames].abs().sum(-1) == 0).sum())  # whole frames masked
            masked_f = int((out[b, :frames].abs().sum(0) == 0).sum())  # whole bins masked
            assert masked_t <= 2 * int(min(50, 0.15 * frames)), (b, masked_t)
            assert masked_f <= 2 * int(min(13, 0.2 * 80)), (b, masked_f)
    assert int((out[3, :10].abs().sum(-1) == 0).sum()) <= 2  # a 10-frame row: masks of at most 1 frame


def test_phoneme_dropout_keeps_bos_and_mixup_pairs_rows():
    torch.manual_seed(0)
    toks = torch.tensor([[BOS_ID, 7, 8, 9], [BOS_ID, 5, 6, 0]])
    assert torch.equal(AIDS.phoneme_dropout(toks, 0.0), toks)
    all_dropped = AIDS.phoneme_dropout(toks, 1.0)
    assert (all_dropped[:, 0] == BOS_ID).all() and (all_dropped[:, 1:] == UNK_ID).all()
    assert AIDS.draw_mixup(1, 0.4, 1.0) is None and AIDS.draw_mixup(4, 0.4, 0.0) is None
    for _ in range(20):
        perm, lam = AIDS.draw_mixup(3, 0.4, 1.0)
        assert 0.5 <= lam <= 1.0 and sorted(perm.tolist()) == [0, 1, 2]
        assert not bool((perm == torch.arange(3)).all())
    feats = torch.stack([torch.zeros(5, 2), torch.ones(5, 2)])
    mixed, lens = AIDS.mix(feats, torch.tensor([1.0, 0.4]), torch.tensor([1, 0]), 0.75)
    assert torch.allclose(mixed[0], torch.full((5, 2), 0.25)) and torch.allclose(mixed[1], torch.full((5, 2), 0.75))
    assert lens.tolist() == [1.0, 1.0]


def _posteriors(blank_share: float, T: int = 20, V: int = 5) -> torch.Tensor:
    """Frames whose blank posterior is ``blank_share``, the rest spread over the other symbols."""
    p = torch.full((1, T, V), (1 - blank_share) / (V - 1))
    p[..., BLANK_ID] = blank_share
    return p.log()


def test_ctc_loss_aids_penalise_what_they_should():
    frames = torch.tensor([20])
    # blank-rate hinge: zero under target + tolerance, linear above
    assert AIDS.blank_rate_hinge(_posteriors(0.5), frames, 0.62, 0.05).item() == 0
    assert AIDS.blank_rate_hinge(_posteriors(0.9), frames, 0.62, 0.05).item() == pytest.approx(0.23, abs=1e-5)
    # coverage: an all-blank row under-covers its 10 tokens; a row whose non-blank mass equals them does not
    args = dict(weight=1.0, margin=3.0, tv_weight=0.0, locked_weight=0.25, locked_margin=0.0, locked_softness=1.0)
    under = AIDS.coverage_loss(_posteriors(0.999), frames, torch.tensor([10]), **args).item()
    assert under == pytest.approx((10 - 20 * 0.001 - 3) / 10, abs=1e-4)
    assert AIDS.coverage_loss(_posteriors(0.5), frames, torch.tensor([10]), **args).item() == pytest.approx(0, abs=1e-6)
    over = AIDS.coverage_loss(_posteriors(0.0), frames, torch.tensor([10]), **args).item()  # 20 mass for 10 tokens
    assert over == pytest.approx(0.25 * (math.log(1 + math.exp(10)) - math.log(2)) / 10, rel=1e-4)
    flicker = torch.stack([_posteriors(0.0)[0, 0], _posteriors(1.0 - 1e-6)[0, 0]] * 10)[None]
    smooth = AIDS.coverage_loss(_posteriors(0.5), frames, torch.tensor([10]), **{**args, "tv_weight": 1.0}).item()
    rough = AIDS.coverage_loss(flicker, frames, torch.tensor([10]), **{**args, "tv_weight": 1.0}).item()
    assert smooth == pytest.approx(0, abs=1e-6) and rough > 0.9
    # entropy: uniform posteriors have log V; the loss aid rewards it (negative)
    assert AIDS.ctc_entropy(torch.full((1, 4, 5), 0.2).log(), torch.tensor([4])).item() == pytest.approx(math.log(5))
    # blank bias lowers the blank, temperature flattens
    logp = _posteriors(0.8)
    biased = AIDS.loss_logp(logp, 1.0, 1.0)
    assert biased[0, 0, BLANK_ID].exp() < 0.8 and torch.allclose(biased.exp().sum(-1), torch.ones(1, 20))
    assert AIDS.loss_logp(logp, 0.0, 1.0) is logp
    flat = AIDS.loss_logp(logp, 0.0, 2.0)
    assert flat[0, 0, BLANK_ID].exp() < 0.8 and flat[0, 0, 1].exp() > logp[0, 0, 1].exp()


def test_attention_duration_and_diagonality():
    U, T = 4, 12
    spikes = torch.zeros(1, U, T)  # each token attends to one frame
    spikes[0, torch.arange(U), torch.arange(U) * 3] = 1.0
    wide = torch.zeros(1, U, T)  # each token spread over its 3 frames, on the diagonal
    for u in range(U):
        wide[0, u, 3 * u: 3 * u + 3] = 1 / 3
    lens_u, lens_t = torch.tensor([U]), torch.tensor([T])
    assert AIDS.attention_duration_loss(wide, lens_u, lens_t, 2.0, 0.3).item() == 0
    # a one-frame spike has an effective width of 1 frame: 2 - 0.3 - 1 below the minimum
    assert AIDS.attention_duration_loss(spikes, lens_u, lens_t, 2.0, 0.3).item() == pytest.approx(0.7)
    halves = torch.zeros(1, U, T)  # each token on 2 frames, half the mass on each: width 2
    halves[0, torch.arange(U), torch.arange(U) * 3] = 0.5
    halves[0, torch.arange(U), torch.arange(U) * 3 + 1] = 0.5
    assert AIDS.attention_duration_loss(halves, lens_u, lens_t, 2.5, 0.0).item() == pytest.approx(0.5, abs=1e-5)
    assert AIDS.diagonality(wide, lens_u, lens_t)[0] == pytest.approx(1.0)
    anti = wide.flip(1)
    assert AIDS.diagonality(anti, lens_u, lens_t)[0] < 0.3
    assert AIDS.length_gap([3, 10], [5, 10]) == [-2, 0]
    # lower is better: PER, off-diagonal attention and a length gap beyond the target all raise the score
    base = AIDS.joint_score(20.0, 1.0, 0.0, 0.3, 0.3, 4.0)
    assert base == pytest.approx(0.2)
    assert AIDS.joint_score(20.0, 0.5, 0.0, 0.3, 0.3, 4.0) == pytest.approx(0.35)
    assert AIDS.joint_score(20.0, 1.0, -6.0, 0.3, 0.3, 4.0) == pytest.approx(0.8)
    assert AIDS.joint_score(20.0, None, None, 0.3, 0.3, 4.0) == pytest.approx(0.2)


def test_loss_aids_switch_warm_up_and_carry_gradients():
    hp = SimpleNamespace(ctc_aids_warmup_epochs=2, blank_rate=True, blank_rate_weight=0.5, blank_rate_weight_final=1.0,
                         blank_rate_warmup_steps=10, blank_rate_target=0.1, blank_rate_tolerance=0.0, coverage=True,
                         coverage_weight=0.12, coverage_margin=0.0, coverage_tv_weight=0.3, coverage_locked_weight=0.25,
                         coverage_locked_margin=0.0, coverage_locked_softness=1.0, ctc_entropy_weight=0.02,
                         attn_duration=True, attn_duration_weight=0.15, attn_min_frames=2.0,
                         attn_duration_tolerance=0.3, attn_duration_warmup_epochs=3)
    logits = torch.randn(2, 10, 5, requires_grad=True)
    attn = torch.softmax(torch.randn(2, 4, 10) * 5, -1)
    frames, n_tok = torch.tensor([10, 8]), torch.tensor([3, 2])
    args = (logits.log_softmax(-1), frames, n_tok, attn, torch.tensor([4, 3]))
    assert AIDS.loss_aids(hp, *args, epoch=2, step=0) == {}  # every aid still warming up
    on = AIDS.loss_aids(hp, *args, epoch=3, step=5)
    assert set(on) == {"blank_rate", "coverage", "entropy"}
    assert set(AIDS.loss_aids(hp, *args, epoch=4, step=5)) == {"blank_rate", "coverage", "entropy", "attn_duration"}
    assert AIDS.ramp(0.5, 1.0, 5, 10) == pytest.approx(0.75) and AIDS.ramp(0.5, 1.0, 50, 10) == 1.0
    sum(on.values()).backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0


def test_input_aids_follow_their_switches_spec_augment_included():
    """``--spec_augment False`` (the default) leaves the features to the other aids: SpeechBrain's SpecAugment is
    not called (it was called whatever the switch said, until the switch was read); with everything off the batch
    passes unchanged."""
    calls = []

    def fea_augment(feats, lens):
        calls.append(feats.shape)
        return feats * 0.0, lens

    hp = SimpleNamespace(spec_augment=False, fea_augment=fea_augment, adaptive_masking=False, adaptive_mask_prob=0.5,
                         frame_dropout=0.0, mixup=False, mixup_alpha=0.4, mixup_prob=1.0, phoneme_dropout=0.0)
    feats, lens, bos = torch.randn(2, 30, 8), torch.tensor([1.0, 0.6]), torch.tensor([[1, 5, 6], [1, 7, 0]])
    f, ln, b, mixup = AIDS.input_aids(hp, feats, lens, bos)
    assert not calls and mixup is None and torch.equal(f, feats) and torch.equal(ln, lens) and torch.equal(b, bos)
    hp.spec_augment = True
    f, *_ = AIDS.input_aids(hp, feats, lens, bos)
    assert calls == [feats.shape] and float(f.abs().sum()) == 0.0
    hp.spec_augment, hp.mixup, hp.frame_dropout = False, True, 0.5
    f, ln, _, mixup = AIDS.input_aids(hp, feats, lens, bos)
    assert len(calls) == 1 and mixup is not None and not torch.equal(f, feats)
