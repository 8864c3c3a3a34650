"""Frame arithmetic, Matcha token layout and duration files (common/durations.py); pure, no Matcha needed."""
import json

import numpy as np
import pytest
import torch

from common.durations import (BLANK, append_alignment, alignment_record, boundaries_to_matcha, export_durations,
                              intersperse_durations, matcha_layout, matcha_num_frames, npy_duration_path,
                              npy_duration_paths, pt_duration_path, read_alignments, read_durations,
                              to_matcha_durations, write_alignments, write_durations)
from common.io import UserError


def test_num_frames_is_floor():
    assert matcha_num_frames(0) == 0
    assert matcha_num_frames(255) == 0
    assert matcha_num_frames(256) == 1
    assert matcha_num_frames(22050) == 86
    assert matcha_num_frames(24000, 300) == 80


def test_rounds_cumulative_boundaries_not_each_duration():
    # 3 tokens of 0.6 frames each: rounding each duration gives 1+1+1 = 3; cumulative rounding gives 1,1,0 (sum 2)
    hop, sr = 256, 25600                      # one Matcha frame = 10 ms
    d = to_matcha_durations([6, 6, 6], 0.001, 2, sr, hop)
    assert d.dtype == torch.long
    assert d.tolist() == [1, 0, 1]            # ends 6, 12, 18 ms -> boundaries 1, 1, 2 frames (18 ms -> T=2)
    d = to_matcha_durations([4, 4, 4, 4], 0.01, 40, sr, hop)
    assert d.tolist() == [4, 4, 4, 28]        # the last token ends at T exactly, whatever the ASR length


def test_last_boundary_is_t_even_when_asr_is_longer():
    d = to_matcha_durations([50, 50, 50], 0.01, 100, 25600, 256)   # ASR says 1.5 s, the mel has 1.0 s
    assert d.tolist() == [50, 50, 0] and int(d.sum()) == 100


@pytest.mark.parametrize("seed", range(40))
def test_random_sums_exact_and_no_negatives(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 60))
    frames = rng.integers(0, 30, size=n)
    asr_s = float(rng.choice([0.01, 0.0125, 0.02]))
    sr, hop = int(rng.choice([22050, 24000])), 256
    true_t = int(round(frames.sum() * asr_s * sr / hop))
    t = int(rng.choice([true_t, max(true_t + int(rng.integers(-3, 4)), 0), int(rng.integers(0, max(n, 1)))]))
    d = to_matcha_durations(frames, asr_s, t, sr, hop)
    assert d.dtype == torch.long and d.shape == (n,)
    assert int(d.sum()) == t
    assert bool((d >= 0).all())
    if t < n:
        assert int((d == 0).sum()) >= n - t
    # every inner boundary is within half a hop of the ASR boundary (where it was not clipped); a token's frames
    # are centred analysis frames, so it ends half a frame before its last cumulative frame (common/frames.py)
    ends = np.maximum(np.cumsum(frames) - 0.5, 0) * asr_s * sr / hop
    bounds = np.cumsum(d.numpy())
    inside = ends[:-1] <= t
    assert np.all(np.abs(bounds[:-1][inside] - ends[:-1][inside]) <= 0.5 + 1e-9)


def test_rejects_bad_counts():
    with pytest.raises(ValueError):
        to_matcha_durations([3, -1], 0.01, 10, 22050, 256)
    with pytest.raises(ValueError):
        to_matcha_durations([1.5, 2.0], 0.01, 10, 22050, 256)
    with pytest.raises(ValueError):
        boundaries_to_matcha([0.2, 0.1], 10, 22050, 256)


def test_intersperse_layout_matches_matcha():
    toks, blanks = [5, 6, 7], [1, 2, 3, 4]
    ref = [0] * 7
    ref[1::2] = toks                       # Matcha's intersperse(lst, 0)
    out = intersperse_durations(toks, blanks)
    assert out.tolist() == [1, 5, 2, 6, 3, 7, 4] and out.dtype == torch.long
    assert [i for i, v in enumerate(ref) if v == 0] == [0, 2, 4, 6]
    with pytest.raises(ValueError):
        intersperse_durations([1, 2], [1, 2])


TOKS = ["pau", "h", "ə", "|", "l", "ˈ", "o", "ʊ", ",", "pau", "w", "pau"]
FRAMES = [5, 3, 2, 1, 4, 1, 3, 3, 2, 10, 4, 8]


def test_layout_with_blanks():
    seq, counts = matcha_layout(TOKS, FRAMES, add_blank=True)
    text = ["h", "ə", "|", "l", "ˈ", "o", "ʊ", ",", "w"]
    assert seq[1::2] == text and all(t == BLANK for t in seq[0::2]) and len(seq) == 2 * len(text) + 1
    got = dict(zip(range(len(seq)), counts))
    assert got[0] == 5                          # leading silence -> b0
    assert got[len(seq) - 1] == 8               # trailing silence -> bN
    assert counts[seq.index("w") - 1] == 2 + 10  # ", pau" pause -> the blank right before "w"
    assert counts[seq.index("l") - 1] == 1       # the word boundary's frame -> the blank before "l"
    assert counts[seq.index("o")] == 3 + 1       # a stress mark inside a word is no pause: its frame -> next phone
    for t in ("|", "ˈ", ","):
        assert counts[seq.index(t)] == 0
    assert sum(counts) == sum(FRAMES) and min(counts) >= 0


def test_layout_without_blanks():
    seq, counts = matcha_layout(TOKS, FRAMES, add_blank=False)
    assert seq == ["h", "ə", "|", "l", "ˈ", "o", "ʊ", ",", "w"]
    assert counts == [5 + 3, 2, 1, 4, 0, 3 + 1, 3, 2 + 10, 4 + 8]
    with pytest.raises(UserError):
        matcha_layout(["pau"], [7], add_blank=False)
    seq, counts = matcha_layout(["pau"], [7], add_blank=True)
    assert seq == [BLANK] and counts == [7]


def test_keep_silence_keeps_pau_as_a_token():
    seq, counts = matcha_layout(["pau", "a", "pau"], [3, 4, 5], add_blank=True, keep_silence=True)
    assert seq == [BLANK, "pau", BLANK, "a", BLANK, "pau", BLANK] and counts == [0, 3, 0, 4, 0, 5, 0]


@pytest.mark.parametrize("seed", range(30))
@pytest.mark.parametrize("add_blank", [True, False])
def test_random_layouts_preserve_frames(seed, add_blank):
    rng = np.random.default_rng(seed)
    vocab = ["a", "b", "ɜ", "ː", "|", ",", "ˈ", "pau", "."]
    n = int(rng.integers(1, 25))
    toks = list(rng.choice(vocab, size=n))
    if not any(t not in ("pau",) for t in toks):
        toks.append("a")
    frames = rng.integers(0, 12, size=len(toks))
    t = int(rng.integers(0, 3 * len(toks)))
    seq, d = export_durations(toks, frames, asr_frame_s=0.01, num_frames=t, sample_rate=22050, hop_length=256,
                              add_blank=add_blank)
    assert len(seq) == len(d) and int(d.sum()) == t and bool((d >= 0).all()) and d.dtype == torch.long
    text = [x for x in toks if x != "pau"]
    assert (seq[1::2] if add_blank else seq) == text


def test_paths_and_collisions(tmp_path):
    assert pt_duration_path(tmp_path, "kal/0001") == (tmp_path / "durations" / "kal" / "0001.pt").resolve()
    with pytest.raises(UserError):
        pt_duration_path(tmp_path, "../x")
    assert npy_duration_path("/c/wavs/kal/0001.wav") == __import__("pathlib").Path("/c/wavs/durations/0001.npy")
    ok = npy_duration_paths([("kal/0001", "/c/wavs/kal/0001.wav"), ("kal/0002", "/c/wavs/kal/0002.wav")])
    assert len(set(ok.values())) == 2
    with pytest.raises(UserError, match="kal/0001.*slt/0001"):
        npy_duration_paths([("kal/0001", "/c/wavs/kal/0001.wav"), ("slt/0001", "/c/wavs/slt/0001.wav")])


@pytest.mark.parametrize("fmt", ["pt", "npy"])
def test_write_and_read_durations(tmp_path, fmt):
    path = tmp_path / "durations" / "kal" / f"0001.{fmt}"
    write_durations(path, torch.tensor([3, 0, 5], dtype=torch.int32), fmt)
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]       # no temp file, no ".npy.npy"
    d = read_durations(path)
    assert d.dtype == torch.long and d.tolist() == [3, 0, 5]
    if fmt == "npy":
        assert np.load(path).dtype == np.int64
    else:
        assert torch.load(path).dtype == torch.long
    with pytest.raises(ValueError):
        write_durations(path, torch.tensor([1.0, 2.0]), fmt)
    with pytest.raises(ValueError):
        write_durations(path, [1, -2], fmt)


def test_alignments_jsonl(tmp_path):
    path = tmp_path / "alignments.jsonl"
    rec = alignment_record("kal/0001", [BLANK, "a", BLANK], [1, 2, 0], add_blank=True, sample_rate=22050,
                           hop_length=256)
    append_alignment(path, rec)
    append_alignment(path, {**rec, "durations": [0, 3, 0]})
    append_alignment(path, alignment_record("kal/0002", ["a"], [4], add_blank=False, sample_rate=22050,
                                            hop_length=256))
    recs = read_alignments(path)
    assert list(recs) == ["kal/0001", "kal/0002"] and recs["kal/0001"]["durations"] == [0, 3, 0]
    assert write_alignments(tmp_path / "b.jsonl", recs.values()) == 2
    with pytest.raises(UserError, match="add_blank"):
        alignment_record("x", ["a", BLANK, "b"], [1, 1, 1], add_blank=True, sample_rate=1, hop_length=1)
    with pytest.raises(UserError, match="equal length"):
        alignment_record("x", ["a"], [1, 1], add_blank=False, sample_rate=1, hop_length=1)
    path.write_text(path.read_text() + "{not json\n", encoding="utf-8")
    with pytest.raises(UserError, match=":4: not valid JSON"):
        read_alignments(path)
    bad = tmp_path / "c.jsonl"
    bad.write_text(json.dumps({"rel_path": "x", "tokens": ["a"], "durations": [-1], "add_blank": False}) + "\n")
    with pytest.raises(UserError, match=">= 0"):
        read_alignments(bad)
    with pytest.raises(UserError, match="not found"):
        read_alignments(tmp_path / "missing.jsonl")
