"""--first_pass hf:DIR (common/hf_first_pass.py): a Hugging Face Wav2Vec2ForCTC phoneme model as the first pass.
Nothing is downloaded: a tiny random Wav2Vec2ForCTC (hidden 32, 2 layers, 16-channel conv stack with wav2vec2's
kernels and strides) with an IPA vocabulary covering the tiny corpus is built and saved here."""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from common.durations import NON_ACOUSTIC, read_alignments
from tests.utils import ROOT, one_line_error, run

transformers = pytest.importorskip("transformers", reason="transformers not installed (requirements.txt)")

from common import hf_first_pass as H  # noqa: E402
from common.vocab import BLANK_ID, SIL, WORD_SEP  # noqa: E402

EXPORT = ROOT / "align" / "export_durations.py"
LONG = "iuɑɔɜ"  # vowels that get a long form "iː": the length mark exists only inside multi-character tokens


def corpus_tokens(corpus: Path) -> dict[str, list[str]]:
    """espeak-ng IPA tokens of every row (the export's default G2P)."""
    from common.g2p import G2P, ipa_to_tokens

    rows = [ln.split("|") for ln in (corpus / "metadata.csv").read_text(encoding="utf-8").splitlines()]
    ph = G2P(None).phonemize_all([(lang, text) for _, _, lang, text in rows], progress=False)
    return {rel: ipa_to_tokens(ph[(lang, text)]) for rel, _, lang, text in rows}


def save_model(out: Path, phones: list[str], delimiter: bool = False, norm: str = "layer") -> Path:
    """A random tiny Wav2Vec2ForCTC + vocab.json: specials, the phones, long vowels, ``tʃ``, ``aɪ``."""
    from transformers import Wav2Vec2Config, Wav2Vec2ForCTC

    vocab = ["<pad>", "<s>", "</s>", "<unk>"] + (["|"] if delimiter else []) + phones \
        + [p + "ː" for p in phones if p in LONG] + ["tʃ", "aɪ"]
    vocab = {t: i for i, t in enumerate(dict.fromkeys(vocab))}
    torch.manual_seed(0)
    cfg = Wav2Vec2Config(
        vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        conv_dim=(16,) * 7, feat_extract_norm=norm, num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4,
        pad_token_id=0, do_stable_layer_norm=norm == "layer")
    Wav2Vec2ForCTC(cfg).save_pretrained(out)
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    if delimiter:
        (out / "tokenizer_config.json").write_text(json.dumps({"pad_token": "<pad>", "word_delimiter_token": "|"}))
    return out


@pytest.fixture(scope="module")
def hf(tiny_corpus, tmp_path_factory):
    corpus = tiny_corpus.parent / "corpus"
    toks = corpus_tokens(corpus)
    seen = sorted({t for row in toks.values() for t in row})
    phones = [t for t in seen if t not in NON_ACOUSTIC and t != "ː"]
    root = tmp_path_factory.mktemp("hf")
    return corpus, toks, phones, save_model(root / "w2v", phones)


def export(corpus, *args, check=True):
    return run([sys.executable, EXPORT, "--corpus", corpus, "--no_progress", "--no_mels", "--device", "cpu", *args],
               check=check)


def test_vocabulary_mapping(hf, tmp_path):
    corpus, toks, phones, model = hf
    scorer, vocab, folder = H.load(f"hf:{model}", "cpu")
    assert folder == model.resolve() and len(vocab) == vocab.columns.shape[1]
    hf_vocab = json.loads((model / "vocab.json").read_text(encoding="utf-8"))
    seen = {t for row in toks.values() for t in row}
    assert seen <= set(vocab.index)  # every corpus token is mapped
    for t in seen:
        if t in NON_ACOUSTIC:  # no counterpart: scored by the blank (the documented fallback)
            assert vocab.index[t] == BLANK_ID, t
        else:  # the rule: every HF phone that equals or contains it
            assert vocab.mapping[t] == sorted(h for h in hf_vocab if not h.startswith("<") and t in h), t
            col = vocab.columns[:, vocab.index[t]]
            assert {i for i in range(len(col)) if col[i]} == {hf_vocab[h] for h in vocab.mapping[t]}
    assert vocab.mapping["ː"] == sorted(p + "ː" for p in phones if p in LONG)  # only inside long vowels
    assert "tʃ" in vocab.mapping["t"] and "tʃ" in vocab.mapping["ʃ"] and "aɪ" in vocab.mapping["ɪ"]
    assert vocab.columns[:, BLANK_ID].tolist() == [1.0] + [0.0] * (len(hf_vocab) - 1)  # the HF blank (<pad>)
    assert vocab.encode(["ʃ", "ˈ", WORD_SEP])[1:] == [BLANK_ID, BLANK_ID]
    # a model with a word delimiter: | is its token (a CTC label), no longer the blank
    _, v2, _ = H.load(f"hf:{save_model(tmp_path / 'delim', phones, delimiter=True)}", "cpu")
    assert v2.mapping[WORD_SEP] == ["|"] and v2.index[WORD_SEP] != BLANK_ID and v2.index["ˈ"] == BLANK_ID


def test_frames_and_scores(hf, tmp_path):
    _, _, phones, model = hf
    scorer, vocab, _ = H.load(f"hf:{model}", "cpu")
    assert scorer.sample_rate == 16000 and scorer.hop == 320 and scorer.hop_s == pytest.approx(0.02)
    assert H.receptive_field(scorer.kernels, scorer.strides) == 400 and scorer.pad == 200
    for n in (400, 719, 720, 16000, 33333):  # padded by half the receptive field: n // hop + 1 (center=True)
        own = int(scorer.model._get_feat_extract_output_lengths(torch.tensor(n + 2 * scorer.pad)))
        assert scorer.num_frames(n) == own == n // 320 + 1
    torch.manual_seed(1)
    wavs = [0.1 * torch.randn(n) for n in (16000, 9000, 4321)]
    from common.model import batch_wavs

    w, lens = batch_wavs(wavs)
    lp, attn, frames = scorer.scores(w, lens, [[]] * 3, False, False)
    assert attn is None and frames == [scorer.num_frames(len(x)) for x in wavs] and lp.shape[2] == len(vocab)
    for k, x in enumerate(wavs):  # batched (attention mask) = one at a time
        one, _, f1 = scorer.scores(x[None], torch.ones(1), [[]], False, False)
        assert f1[0] == frames[k] and (one[0] - lp[k, : frames[k]]).abs().max() < 1e-4
        # the blank column is the HF model's own log-posterior of <pad>, normalized as the feature extractor does
        x16 = torch.nn.functional.pad((x - x.mean()) / torch.sqrt(x.var(unbiased=False) + 1e-7), (200, 200))
        with torch.no_grad():
            ref = torch.log_softmax(scorer.model(x16[None]).logits, -1)[0, :, 0]
        assert (one[0, :, BLANK_ID] - ref).abs().max() < 1e-4
    with pytest.raises(Exception, match="no attention"):
        scorer.scores(w, lens, [[]] * 3, True, False)
    # a group-norm model (wav2vec2-base style) is run one row at a time: the same scores as alone
    s2, _, _ = H.load(f"hf:{save_model(tmp_path / 'group', phones, norm='group')}", "cpu")
    lp2, _, _ = s2.scores(w, lens, [[]] * 3, False, False)
    one, _, _ = s2.scores(wavs[2][None], torch.ones(1), [[]], False, False)
    assert (one[0] - lp2[2, : frames[2]]).abs().max() < 1e-5


def test_export_end_to_end(hf, tmp_path):
    """Durations per token of Matcha's sequence, summing to the mel length floor(samples / 256), refined or not."""
    src, toks, _, model = hf
    corpus = tmp_path / "corpus"
    shutil.copytree(src, corpus, ignore=shutil.ignore_patterns("durations", "textgrids", "mels"))
    for extra, grid in ((["--no_refine"], 0.02), (["--refine_rounds", "2"], 0.001)):
        export(corpus, "--first_pass", f"hf:{model}", "--scores", "ctc", "--overwrite", *extra)
        rep = json.loads((corpus / "durations" / "export_report.json").read_text())
        assert rep["counts"] == {"success": len(toks), "failure": 0, "skipped_existing": 0, "total": len(toks)}
        assert rep["model_family"] == "hf" and rep["model_dir"] is None and rep["checkpoint"] == str(model.resolve())
        assert rep["options"]["first_pass"] == f"hf:{model}" and rep["scores"] == "ctc"
        al = read_alignments(corpus / "durations" / "alignments.jsonl")
        for rel, t in toks.items():
            d = torch.load(corpus / "durations" / f"{rel}.pt")
            n = sf.info(corpus / "wavs" / f"{rel}.wav").frames
            assert d.dtype == torch.long and bool((d >= 0).all()) and int(d.sum()) == n // 256, rel
            assert len(d) == 2 * len(t) + 1 and al[rel]["tokens"][1::2] == t, rel  # [0, p1, 0, ..., pN, 0]
            units = al[rel]["aligned_tokens"]
            assert units[0] == units[-1] == SIL and units[1:-1] == t
        ends = np.concatenate([np.asarray(a["aligned_ends_s"][:-1]) for a in al.values()])
        k = ends / grid + 0.5  # first pass: boundaries between 20 ms frames centred at t * 20 ms
        assert np.all(np.abs(k - np.round(k)) < 0.02)
    assert rep["refine"]["rounds"] and len(rep["refine"]["rounds"]) == 2


def test_errors(hf, tmp_path):
    src, toks, phones, model = hf
    corpus = tmp_path / "corpus"
    shutil.copytree(src, corpus, ignore=shutil.ignore_patterns("durations", "textgrids", "mels"))
    # a corpus symbol no HF token equals or contains: one line naming it and the model
    narrow = save_model(tmp_path / "narrow", [p for p in phones if p != "ə"])
    one_line_error(export(corpus, "--first_pass", f"hf:{narrow}", "--scores", "ctc", check=False),
                   "'ə'", "no counterpart in the vocabulary", str(narrow))
    one_line_error(export(corpus, "--first_pass", f"hf:{tmp_path / 'nope'}", "--scores", "ctc", check=False),
                   "no such folder")
    (tmp_path / "empty").mkdir()
    one_line_error(export(corpus, "--first_pass", f"hf:{tmp_path / 'empty'}", "--scores", "ctc", check=False),
                   "no config.json")
    one_line_error(export(corpus, "--first_pass", "hf:nobody/no-such-model", "--scores", "ctc", check=False),
                   "not in the local Hugging Face cache", "nothing is downloaded")
    for kind in ("attention", "joint"):  # no attention: only CTC scores
        one_line_error(export(corpus, "--first_pass", f"hf:{model}", "--scores", kind, check=False),
                       "no attention", "--scores ctc")
    novocab = tmp_path / "novocab"
    shutil.copytree(model, novocab, ignore=shutil.ignore_patterns("vocab.json"))
    one_line_error(export(corpus, "--first_pass", f"hf:{novocab}", "--scores", "ctc", check=False), "no vocab.json")
    one_line_error(export(corpus, "--first_pass", "wav2vec2", "--scores", "ctc", check=False), "hf:DIR_OR_NAME")
    assert not (corpus / "durations").exists()
