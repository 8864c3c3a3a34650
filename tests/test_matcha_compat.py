"""Our durations load through upstream Matcha-TTS's own code (TextMelDataset, mel_spectrogram, generate_path).

Needs ``pip install --no-deps matcha-tts==0.0.7.2`` plus its import-time dependencies
(``lightning librosa unidecode inflect hydra-core rich gdown wget``) and espeak-ng (matcha.text.cleaners builds an
espeak backend at import). Skipped, naming the install command, when matcha cannot be imported.
``torchaudio.load`` needs torchcodec since torchaudio 2.9, so Matcha's ``ta.load`` is pointed at soundfile here.
"""
import numpy as np
import pytest
import soundfile as sf
import torch

INSTALL = ("pip install --no-deps matcha-tts==0.0.7.2 && "
           "pip install lightning librosa unidecode inflect hydra-core rich gdown wget")
try:
    import matcha.data.text_mel_datamodule as tmd
    from matcha.text import text_to_sequence
    from matcha.utils.audio import mel_spectrogram
    from matcha.utils.model import generate_path, sequence_mask
    from matcha.utils.utils import intersperse
except Exception as err:  # ImportError, or espeak missing for matcha.text.cleaners
    pytest.skip(f"matcha-tts not importable ({type(err).__name__}: {err}); install with: {INSTALL}",
                allow_module_level=True)

from common.durations import (BLANK, export_durations, matcha_num_frames, npy_duration_paths, pt_duration_path,  # noqa: E402
                              read_durations, write_durations)
from common.io import UserError  # noqa: E402
from common.vocab import symbol_to_token  # noqa: E402

SR, HOP, N_FFT = 22050, 256, 1024
CLEANERS = ["basic_cleaners"]
TEXTS = {"0001": "Hello, world.", "0002": "A tiny test!", "0003": "Durations, exactly matched; ok?"}


def _sf_load(path):
    data, sr = sf.read(str(path), dtype="float32", always_2d=True)
    return torch.from_numpy(data.T.copy()), sr


def _fake_alignment(text: str, rng, seconds: float):
    """Our tokens for Matcha's cleaned text (space -> '|') with silence around, and random ASR-frame counts."""
    _, cleaned = text_to_sequence(text, CLEANERS)
    tokens = ["pau"] + [symbol_to_token(ch) for ch in cleaned] + ["pau"]
    frames = rng.integers(1, 12, size=len(tokens))
    frames = np.maximum(np.round(frames * seconds * 100 / frames.sum()), 0).astype(int)   # ~10 ms ASR frames
    return tokens, frames, cleaned


def _check_with_generate_path(durations: list[torch.Tensor], mel_lengths: list[int]):
    """Batch the durations as TextMelBatchCollate does and expand them with Matcha's generate_path."""
    x_lengths = torch.tensor([len(d) for d in durations])
    y_lengths = torch.tensor(mel_lengths)
    dur = torch.zeros(len(durations), int(x_lengths.max()), dtype=torch.long)
    for i, d in enumerate(durations):
        dur[i, : len(d)] = d
    x_mask = sequence_mask(x_lengths, int(x_lengths.max())).unsqueeze(1).float()
    y_mask = sequence_mask(y_lengths, int(y_lengths.max())).unsqueeze(1).float()
    attn_mask = x_mask.unsqueeze(-1) * y_mask.unsqueeze(2)
    attn = generate_path(dur, attn_mask.squeeze(1))                       # as matcha_tts.py with precomputed durations
    for i, (tx, ty) in enumerate(zip(x_lengths.tolist(), y_lengths.tolist())):
        assert torch.equal(attn[i, :tx, :ty].sum(0), torch.ones(ty)), "every mel frame belongs to exactly one token"
        assert torch.equal(attn[i, :tx].sum(-1).long(), dur[i, :tx])


def test_num_frames_matches_matcha_mel():
    rng = np.random.default_rng(0)
    for n in [N_FFT, 5000, 22050, *rng.integers(2000, 60000, size=5).tolist()]:
        y = torch.from_numpy(rng.uniform(-0.5, 0.5, size=(1, n)).astype(np.float32))
        mel = mel_spectrogram(y, N_FFT, 80, SR, HOP, N_FFT, 0, 8000, center=False)
        assert mel.shape[-1] == matcha_num_frames(n, HOP), n


@pytest.mark.parametrize("add_blank", [True, False])
def test_npy_layout_loads_in_text_mel_dataset(tmp_path, monkeypatch, add_blank):
    monkeypatch.setattr(tmd.ta, "load", _sf_load)
    rng = np.random.default_rng(1)
    data_dir = tmp_path / "corpus"
    rows, lines, expected = [], [], {}
    for stem, text in TEXTS.items():
        wav = data_dir / "wavs" / f"{stem}.wav"
        wav.parent.mkdir(parents=True, exist_ok=True)
        n = int(rng.integers(int(0.8 * SR), int(2.0 * SR)))
        t = np.arange(n) / SR
        sf.write(wav, (0.3 * np.sin(2 * np.pi * 220 * t) + 0.01 * rng.standard_normal(n)).astype(np.float32), SR)
        rows.append((f"wavs/{stem}", wav))
        lines.append(f"{wav}|{text}")
        expected[str(wav)] = (text, n)
    paths = npy_duration_paths(rows)
    for rel, wav in rows:
        text, n = expected[str(wav)]
        tokens, frames, cleaned = _fake_alignment(text, rng, n / SR)
        seq, d = export_durations(tokens, frames, asr_frame_s=0.01, num_frames=matcha_num_frames(n, HOP),
                                  sample_rate=SR, hop_length=HOP, add_blank=add_blank)
        assert [s for s in seq if s != BLANK] == [symbol_to_token(c) for c in cleaned]
        write_durations(paths[rel], d, "npy")
    filelist = tmp_path / "train.txt"
    filelist.write_text("\n".join(lines) + "\n", encoding="utf-8")

    ds = tmd.TextMelDataset(str(filelist), 1, CLEANERS, add_blank=add_blank, n_fft=N_FFT, n_mels=80,
                            sample_rate=SR, hop_length=HOP, win_length=N_FFT, f_min=0.0, f_max=8000,
                            load_durations=True)
    items = [ds[i] for i in range(len(ds))]
    for it in items:
        text, n = expected[it["filepath"]]
        seq_ids, _ = text_to_sequence(text, CLEANERS)
        assert len(it["durations"]) == len(it["x"]) == (len(intersperse(seq_ids, 0)) if add_blank else len(seq_ids))
        assert int(it["durations"].sum()) == it["y"].shape[-1] == matcha_num_frames(n, HOP)
        assert bool((it["durations"] >= 0).all())
    batch = tmd.TextMelBatchCollate(1)(items)
    assert batch["durations"] is not None and batch["durations"].dtype == torch.long
    _check_with_generate_path([it["durations"] for it in items], [it["y"].shape[-1] for it in items])


def test_npy_layout_stem_collision_is_an_error(tmp_path):
    with pytest.raises(UserError, match="both write"):
        npy_duration_paths([("kal/0001", tmp_path / "wavs/kal/0001.wav"), ("slt/0001", tmp_path / "wavs/slt/0001.wav")])


def test_pt_layout_matches_precomputed_mels(tmp_path):
    rng = np.random.default_rng(2)
    corpus = tmp_path / "corpus"
    durations, mel_lengths = [], []
    for i, (stem, text) in enumerate(TEXTS.items()):
        rel = f"{i % 2}/{stem}"
        t_mel = int(rng.integers(60, 200))
        mel_path = corpus / "mels" / f"{rel}.npy"
        mel_path.parent.mkdir(parents=True, exist_ok=True)
        np.save(mel_path, rng.standard_normal((80, t_mel)).astype(np.float32))
        tokens, frames, _ = _fake_alignment(text, rng, t_mel * HOP / SR * 1.03)   # ASR length a bit off
        num_frames = np.load(mel_path).shape[-1]                                  # the mel is the truth
        seq, d = export_durations(tokens, frames, asr_frame_s=0.01, num_frames=num_frames, sample_rate=SR,
                                  hop_length=HOP, add_blank=True)
        out = write_durations(pt_duration_path(corpus, rel), d, "pt")
        assert out == corpus.resolve() / "durations" / f"{rel}.pt"
        loaded = torch.load(out)
        seq_ids, _ = text_to_sequence(text, CLEANERS)
        assert loaded.dtype == torch.long and len(loaded) == len(intersperse(seq_ids, 0))
        assert int(loaded.sum()) == t_mel and torch.equal(read_durations(out), loaded)
        durations.append(loaded)
        mel_lengths.append(t_mel)
    _check_with_generate_path(durations, mel_lengths)
