"""The export's per-utterance helpers (common/first_pass.py: CTC emission spans, anchoring, confidence), resampling
(common/audio.py) and the recognizer's precision (common/export.py), each against a plain reference."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torchaudio
import torchaudio.functional as taf

from common import first_pass as A
from common.audio import resample
from common.export import PRECISIONS, cpu_has_bf16, resolve_precision
from common.io import UserError


def _cases(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    for k in range(n):
        T = int(rng.integers(5, 300))
        lp = torch.log_softmax(torch.from_numpy(rng.normal(size=(T, 30)) * rng.choice([1.0, 6.0])).float(), -1)
        ids = rng.integers(1, 30, size=int(rng.integers(1, max(2, T // 3)))).tolist()
        if k % 4 == 0 and len(ids) > 1:
            ids[1] = ids[0]  # a repeat: CTC needs a blank between them
        yield lp, ids, bool(k % 2), rng


def test_ctc_emissions_are_torchaudio_merge_tokens_spans():
    aligned = 0
    for lp, ids, _, _ in _cases(200):
        got = A.ctc_emissions(lp, ids)
        try:
            ali, sc = taf.forced_align(lp[None], torch.tensor([ids], dtype=torch.int32), blank=0)
            spans = taf.merge_tokens(ali[0], sc[0].exp(), blank=0)
            want = [(s.start, s.end) for s in spans] if len(spans) == len(ids) else None
        except (RuntimeError, ValueError):
            want = None
        assert got == want
        aligned += got is not None
    assert aligned > 100
    assert A.ctc_emissions(torch.log_softmax(torch.zeros(2, 5), -1), [1, 1, 1]) is None  # too few frames
    assert A.ctc_emissions(torch.log_softmax(torch.zeros(4, 5), -1), []) is None


def test_anchor_forbids_other_rows_at_each_emission():
    for lp, ids, lead, _ in _cases(60, seed=1):
        spans = A.ctc_emissions(lp, ids)
        if not spans:
            continue
        score = torch.randn(len(ids) + 2, lp.shape[0])
        want = score.clone()
        off = int(lead)
        for k, (a, b) in enumerate(spans):
            keep = want[k + off, a:b].clone()
            want[:, a:b] = A.FORBID
            want[k + off, a:b] = keep
        assert torch.equal(A.anchor(score, spans, lead), want)


def test_token_confidence_is_the_mean_non_blank_posterior():
    for lp, ids, lead, rng in _cases(60, seed=2):
        units = len(ids) + int(lead) + 1
        frames = rng.multinomial(lp.shape[0], np.ones(units) / units)
        nb = lp.clone()
        nb[:, 0] = -float("inf")
        post = torch.softmax(nb, -1).numpy()
        starts = np.concatenate([[0], np.cumsum(frames)[:-1]])
        want = [post[starts[k + lead]: starts[k + lead] + frames[k + lead], t].mean() if frames[k + lead] else 0.0
                for k, t in enumerate(ids)]
        got = A.token_confidence(lp, ids, frames, lead)
        assert np.allclose(got, want, atol=1e-5) and np.all((got >= 0) & (got <= 1))


@pytest.mark.parametrize("orig,new", [(22050, 16000), (44100, 16000), (16000, 22050), (8000, 16000)])
def test_resample_keeps_torchaudio_lengths_and_the_signal(orig, new):
    for n in (5, 1001, 22083):
        for shape in ((n,), (2, n)):
            x = torch.randn(shape)
            assert resample(x, orig, new).shape == taf.resample(x, orig, new).shape
    t = torch.arange(orig) / orig  # one second of a 1 kHz tone
    y = resample(torch.sin(2 * torch.pi * 1000 * t), orig, new)
    spec = torch.fft.rfft(y[new // 10: -new // 10]).abs()  # away from the edges
    peak_hz = float(torch.argmax(spec)) * new / (len(y) - 2 * (new // 10))
    assert abs(peak_hz - 1000) < 5
    assert abs(float(y[new // 10: -new // 10].abs().max()) - 1.0) < 0.02
    ref = torchaudio.functional.resample(torch.sin(2 * torch.pi * 1000 * t), orig, new)
    assert float((y - ref)[new // 10: -new // 10].abs().max()) < 0.01  # the model was trained on torchaudio's
    assert resample(x, new, new) is x


def test_resolve_precision():
    assert resolve_precision("fp32", "cpu") == "fp32" and resolve_precision("bf16", "cpu") == "bf16"
    assert resolve_precision("auto", "cuda") == "bf16"
    assert resolve_precision("auto", "cpu") == ("bf16" if cpu_has_bf16() else "fp32")
    assert PRECISIONS == ("auto", "fp32", "bf16")
    with pytest.raises(UserError, match="--precision must be one of auto, fp32, bf16"):
        resolve_precision("fp16", "cpu")


def test_bf16_autocast_engages_on_cpu(tiny_model):
    """The bf16 path really computes in bf16 (its scores differ from fp32 by rounding), close to fp32."""
    from common.export import _model_scores
    from common.model import batch_tokens_bos, batch_wavs, load_for_inference

    modules, hparams, _ = load_for_inference(tiny_model, "cpu")
    g = torch.Generator().manual_seed(0)
    wavs, lens = batch_wavs([torch.randn(16000, generator=g) * 0.1, torch.randn(12000, generator=g) * 0.1])
    tok, tok_lens = batch_tokens_bos([[3, 4, 5], [6, 7]])
    out = {amp: _model_scores(modules, hparams, wavs, lens, tok, tok_lens, "joint", amp) for amp in (False, True)}
    (c32, a32, f32), (c16, a16, f16) = out[False], out[True]
    assert f32 == f16 and c16.dtype == torch.float32 and a16.dtype == torch.float32
    diff = (c32.exp() - c16.exp()).abs()
    assert 0 < float(diff.max()) < 0.2 and float(diff.mean()) < 0.01
    assert float((a32 - a16).abs().mean()) < 0.01
