"""common/decoding.py on hand-made CTC posteriors (exact answers), and recipes/decode.py on a tiny trained model."""
from __future__ import annotations

import itertools
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from common.decoding import (
    DecodeOptions, PhonemePrefixBeamSearcher, adjust_log_probs, best_path, ctc_greedy_decode, length_sorted_batches,
)
from common.io import UserError, read_manifest, write_manifest
from tests.utils import ROOT, OVERFIT_UTTS, run

from recipes.decode import main as decode_main


# ------------------------------------------------------------------------------------------------------------------
# Hand-made posteriors
# ------------------------------------------------------------------------------------------------------------------
def logp(rows) -> torch.Tensor:
    p = torch.tensor(rows, dtype=torch.float64) + 1e-12
    return torch.log(p / p.sum(-1, keepdim=True)).float()


def collapse(path, blank=0):
    out, prev = [], None
    for lab in path:
        if lab != blank and lab != prev:
            out.append(lab)
        prev = lab
    return tuple(out)


def brute_force(lp: np.ndarray, bonus: float):
    """(best single path's tokens, most probable token sequence) with ``bonus`` per token, by enumeration."""
    T, V = lp.shape
    seq_logp, best = {}, (-np.inf, None)
    for path in itertools.product(range(V), repeat=T):
        s = float(sum(lp[t, k] for t, k in enumerate(path)))
        c = collapse(path)
        seq_logp[c] = np.logaddexp(seq_logp.get(c, -np.inf), s)
        if s + bonus * len(c) > best[0]:
            best = (s + bonus * len(c), c)
    return best[1], max(seq_logp, key=lambda c: seq_logp[c] + bonus * len(c))


def exact_searcher(V, bonus=0.0):
    return PhonemePrefixBeamSearcher(V, beam_size=200, insertion_bonus=bonus, beam_prune_logp=-1e9,
                                     token_prune_min_logp=-1e9, prune_history=False)


def test_greedy_known_answers():
    lp = logp([[.1, .8, .1], [.1, .8, .1], [.9, .05, .05], [.2, .1, .7], [.1, .1, .8]])
    assert ctc_greedy_decode(lp[None], torch.ones(1)) == [[1, 2]]
    assert best_path(lp) == [1, 2]
    assert best_path(lp, insertion_bonus=-20.0) == []  # every token costs more than it explains
    # a blank between equal labels makes two tokens, no blank makes one
    assert best_path(logp([[.1, .9, 0], [.9, .1, 0], [.1, .9, 0]])) == [1, 1]
    assert best_path(logp([[.1, .9, 0], [.1, .9, 0]])) == [1]
    # padded frames (relative lengths) are not decoded
    two = torch.stack([lp, logp([[.9, .1, 0]] * 3 + [[.1, .1, .8]] * 2)])
    assert ctc_greedy_decode(two, torch.tensor([1.0, 0.6]), insertion_bonus=0.5) == [[1, 2], []]


def test_best_path_and_prefix_beam_are_exact():
    rng = np.random.default_rng(0)
    for trial in range(40):
        lp = torch.log_softmax(torch.tensor(rng.normal(size=(5, 3)) * 2.0), -1).float()
        bonus = [0.0, -1.0, 1.0, 2.5][trial % 4]
        path_ref, seq_ref = brute_force(lp.double().numpy(), bonus)
        assert tuple(best_path(lp, bonus)) == path_ref
        assert tuple(exact_searcher(3, bonus).decode_ids(lp[None], torch.ones(1))[0]) == seq_ref
        if bonus == 0.0:  # the library's greedy decoder is the bonus-free best path
            assert tuple(ctc_greedy_decode(lp[None], torch.ones(1))[0]) == path_ref


def test_prefix_beam_beats_greedy_where_paths_add_up():
    # P("") = .36 is the best single path, but P("a") = .16 + .24 + .24 = .64
    lp = logp([[.6, .4], [.6, .4]])
    assert ctc_greedy_decode(lp[None], torch.ones(1)) == [[]]
    searcher = PhonemePrefixBeamSearcher(2, beam_size=4)
    assert searcher.decode_ids(lp[None], torch.ones(1)) == [[1]]
    assert PhonemePrefixBeamSearcher(2, beam_size=4, insertion_bonus=-1.0).decode_ids(lp[None], torch.ones(1)) == [[]]


def test_prefix_beam_multichar_vocab_and_batch():
    # ids map to single characters, so token 12 is never confused with tokens 1 + 2
    V = 13
    rows = np.full((4, V), 1e-4)
    for t, k in enumerate([1, 2, 0, 12]):
        rows[t, k] = 1.0
    lp = logp(rows.tolist())
    pad = torch.cat([logp([[1.0] + [1e-4] * (V - 1)] * 2), torch.zeros(2, V)])  # 2 real frames, 2 padding
    searcher = PhonemePrefixBeamSearcher(V, beam_size=8)
    assert searcher.decode_ids(torch.stack([lp, pad]), torch.tensor([1.0, 0.5])) == [[1, 2, 12], []]


def test_knobs_on_posteriors():
    lp = logp([[.5, .3, .2], [.7, .2, .1]])
    assert torch.allclose(adjust_log_probs(lp), lp, atol=1e-6)
    pen = adjust_log_probs(lp, blank_penalty=1.0)
    assert torch.allclose(pen.exp().sum(-1), torch.ones(2))
    assert (pen[:, 0] < lp[:, 0]).all() and (pen[:, 1:] > lp[:, 1:]).all()
    # blank odds drop by exactly e^-1
    assert torch.allclose(pen[:, 0] - pen[:, 1], lp[:, 0] - lp[:, 1] - 1.0, atol=1e-5)
    hot = adjust_log_probs(lp, temperature=3.0)

    def entropy(x):
        return -(x.exp() * x).sum(-1)

    assert (entropy(hot) > entropy(lp)).all()
    with pytest.raises(ValueError):
        adjust_log_probs(lp, temperature=0.0)
    # blank-dominated frames: greedy gives nothing, a big blank penalty makes tokens appear
    assert best_path(lp) == [] and best_path(adjust_log_probs(lp, blank_penalty=3.0)) == [1]


def test_options_and_batches():
    with pytest.raises(UserError, match="temperature"):
        DecodeOptions(temperature=0).check()
    with pytest.raises(UserError, match="ctc_weight"):
        DecodeOptions(decoder="attention", ctc_weight=1.5).check()
    with pytest.raises(UserError, match="decoder"):
        DecodeOptions(decoder="viterbi").check()
    durs = [3.0, 1.0, 2.0, 5.0, 4.0]
    batches = length_sorted_batches(durs, 2)
    assert batches == [[3, 4], [0, 2], [1]]
    assert sorted(i for b in batches for i in b) == list(range(5))


# ------------------------------------------------------------------------------------------------------------------
# recipes/decode.py on a trained tiny model
# ------------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module", autouse=True)
def _restore_torch_threads():
    n = torch.get_num_threads()  # decode_main(--num_threads 1) sets it for the whole process
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def decode_csv(tiny_corpus, tmp_path_factory) -> Path:
    """The overfit training rows (well learned) plus unseen ones (errors), so PER is neither 0 nor 100."""
    rows = read_manifest(tiny_corpus / "train.csv")[: OVERFIT_UTTS + 4]
    path = tmp_path_factory.mktemp("decode") / "eval.csv"
    write_manifest(path, rows)
    return path


def decode(model, csv, out, *extra, capsys=None):
    rc = decode_main(["hparams/phoneme.yaml", "--model_dir", str(model), "--test_csv", str(csv), "--output",
                      str(out), "--num_threads", "1", *map(str, extra)])
    text = capsys.readouterr() if capsys else None
    assert rc == 0, text.err[-2000:] if text else rc
    recs = [json.loads(line) for line in Path(out).read_text().splitlines()]
    return recs, text


def edit_distance(a, b) -> int:
    d = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        prev, d[0] = d[0], i
        for j, y in enumerate(b, 1):
            prev, d[j] = d[j], min(d[j] + 1, d[j - 1] + 1, prev + (x != y))
    return d[-1]


def total_len(recs) -> int:
    return sum(len(r["hyp"].split()) for r in recs)


@pytest.fixture(scope="module")
def results(tiny_model, decode_csv, tmp_path_factory):
    out = tmp_path_factory.mktemp("decoded")
    res = {}
    for dec in ("ctc_greedy", "ctc_beam", "attention"):
        rc = decode_main(["hparams/phoneme.yaml", "--model_dir", str(tiny_model), "--test_csv", str(decode_csv),
                          "--decoder", dec, "--output", str(out / f"{dec}.jsonl"), "--num_threads", "1"])
        assert rc == 0
        res[dec] = [json.loads(line) for line in (out / f"{dec}.jsonl").read_text().splitlines()]
    return res


def test_every_decoder_writes_valid_jsonl(results, decode_csv):
    rows = read_manifest(decode_csv)
    for dec, recs in results.items():
        assert [r["id"] for r in recs] == [r["ID"] for r in rows], dec  # manifest order, every row
        for r, row in zip(recs, rows):
            assert set(r) == {"id", "ref", "hyp", "per"}
            assert r["ref"] == " ".join(row["phn"].split())
            assert r["per"] >= 0 and isinstance(r["hyp"], str)
        assert total_len(recs) > 0, dec
    # the overfit rows are learned: every decoder is far better than chance there
    for dec, recs in results.items():
        assert np.mean([r["per"] for r in recs[:OVERFIT_UTTS]]) < 50, (dec, recs[:OVERFIT_UTTS])


def test_per_matches_recomputation(results, decode_csv, tiny_model, tmp_path, capsys):
    recs = results["ctc_greedy"]
    edits = refs = 0
    for r in recs:
        ref, hyp = r["ref"].split(), r["hyp"].split()
        e = edit_distance(ref, hyp)
        assert r["per"] == pytest.approx(100.0 * e / len(ref), abs=1e-3)
        edits, refs = edits + e, refs + len(ref)
    _, text = decode(tiny_model, decode_csv, tmp_path / "g.jsonl", capsys=capsys)
    assert f"PER {100.0 * edits / refs:.2f}%" in text.out
    assert f"{len(recs)} utts" in text.out and "sub " in text.out and "del " in text.out and "ins " in text.out


def test_greedy_and_beam_mostly_agree(results):
    g, b = results["ctc_greedy"], results["ctc_beam"]
    dists = [edit_distance(x["hyp"].split(), y["hyp"].split()) for x, y in zip(g, b)]
    pairs = [(x["hyp"], y["hyp"]) for x, y in zip(g, b)]
    assert sum(d == 0 for d in dists) >= 0.3 * len(g), pairs
    assert sum(dists) <= 0.1 * total_len(g), (dists, pairs)
    # on the learned (overfit) rows the two must nearly coincide; on unseen rows an uncertain model may legitimately
    # differ more on one utterance (the sum over paths vs the single best path), which the bounds above cover
    assert all(d <= 0.25 * max(len(x["hyp"].split()), 4)
               for d, x in zip(dists[:OVERFIT_UTTS], g[:OVERFIT_UTTS])), (dists, pairs)
    # the beam (sum over paths) is not worse than the single best path overall
    assert sum(r["per"] for r in b) <= sum(r["per"] for r in g) + 2 * len(g)


@pytest.mark.parametrize("dec", ["ctc_greedy", "ctc_beam"])
def test_blank_penalty_and_insertion_bonus_directions(results, tiny_model, decode_csv, tmp_path, dec):
    base = total_len(results[dec])
    more, _ = decode(tiny_model, decode_csv, tmp_path / "p.jsonl", "--decoder", dec, "--blank_penalty", 8)
    fewer, _ = decode(tiny_model, decode_csv, tmp_path / "b.jsonl", "--decoder", dec, "--insertion_bonus", -6)
    assert total_len(more) > base > total_len(fewer)


def test_attention_insertion_bonus_and_ctc_weight(results, tiny_model, decode_csv, tmp_path):
    base = total_len(results["attention"])
    fewer, _ = decode(tiny_model, decode_csv, tmp_path / "a.jsonl", "--decoder", "attention",
                      "--insertion_bonus", -8, "--beam_size", 4)
    assert total_len(fewer) < base
    pure, _ = decode(tiny_model, decode_csv, tmp_path / "c.jsonl", "--decoder", "attention", "--ctc_weight", 0,
                     "--temperature", 1.3, "--beam_size", 2)
    assert len(pure) == len(results["attention"])


def test_audio_prints_tokens(tiny_model, tiny_corpus, tmp_path, capsys):
    import soundfile as sf

    from common.audio import load_audio

    row = read_manifest(tiny_corpus / "train.csv")[0]
    wav, sr = load_audio(row["wav"])
    path = tmp_path / "x44k.wav"
    sf.write(path, np.repeat(wav.numpy(), 2), 2 * sr)  # any sample rate: 44.1 kHz here
    rc = decode_main(["hparams/phoneme.yaml", "--model_dir", str(tiny_model), "--audio", str(path),
                      "--num_threads", "1"])
    out = capsys.readouterr().out.strip().splitlines()
    assert rc == 0 and len(out) == 1
    vocab = set(line.split("\t")[0] for line in (tiny_model / "tokens.txt").read_text().splitlines())
    toks = out[0].split()
    assert toks and set(toks) <= vocab
    assert edit_distance(toks, row["phn"].split()) < 0.5 * len(row["phn"].split())


def test_default_model_dir_from_hparams_overrides(tiny_model, decode_csv, tmp_path, capsys):
    # no --model_dir: output_folder comes from the hparams file with SpeechBrain-style overrides
    rc = decode_main(["hparams/phoneme.yaml", "--test_csv", str(decode_csv), "--output_folder", str(tiny_model),
                      "--output", str(tmp_path / "d.jsonl"), "--num_threads", "1"])
    assert rc == 0, capsys.readouterr().err
    assert len((tmp_path / "d.jsonl").read_text().splitlines()) == len(read_manifest(decode_csv))


def _one_line_error(args, *needles, capsys):
    rc = decode_main(["hparams/phoneme.yaml", "--num_threads", "1", *map(str, args)])
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    for n in needles:
        assert n in err, err


def test_bad_inputs_give_one_line_errors(tiny_model, decode_csv, tmp_path, capsys):
    m = ["--model_dir", tiny_model]
    _one_line_error(["--model_dir", tmp_path / "nope", "--test_csv", decode_csv], "not found", capsys=capsys)
    empty_run = tmp_path / "run"
    empty_run.mkdir()
    for f in ("hyperparams.yaml", "tokens.txt"):  # a run folder whose save/ has no checkpoint
        (empty_run / f).write_text((tiny_model / f).read_text().replace(str(tiny_model), str(empty_run)))
    _one_line_error(["--model_dir", empty_run, "--test_csv", decode_csv], "no checkpoint", capsys=capsys)
    _one_line_error([*m, "--test_csv", tmp_path / "missing.csv"], "missing.csv", "not found", capsys=capsys)
    header_only = tmp_path / "empty.csv"
    header_only.write_text("ID,wav,duration,spk_id,language,text,phn\n")
    _one_line_error([*m, "--test_csv", header_only], "empty", capsys=capsys)
    rows = read_manifest(decode_csv)[:3]
    rows[1] = {**rows[1], "phn": rows[1]["phn"] + " zzq"}
    bad_tok = tmp_path / "badtok.csv"
    write_manifest(bad_tok, rows)
    _one_line_error([*m, "--test_csv", bad_tok], "badtok.csv:3", rows[1]["ID"], "'zzq'", capsys=capsys)
    junk = tmp_path / "junk.wav"
    junk.write_bytes(b"not a wav file at all" * 10)
    _one_line_error([*m, "--audio", junk], "junk.wav", "cannot read audio", capsys=capsys)
    rows = read_manifest(decode_csv)[:2]
    rows[0] = {**rows[0], "wav": str(junk)}
    bad_wav = tmp_path / "badwav.csv"
    write_manifest(bad_wav, rows)
    _one_line_error([*m, "--test_csv", bad_wav], "badwav.csv:2", "cannot read audio", capsys=capsys)
    _one_line_error([*m], "--test_csv", capsys=capsys)
    _one_line_error([*m, "--test_csv", decode_csv, "--temperature", 0], "temperature", capsys=capsys)


def test_cli_subprocess_one_line_error(tmp_path):
    r = run([sys.executable, ROOT / "recipes/decode.py", ROOT / "hparams/phoneme.yaml", "--model_dir",
             tmp_path / "nope", "--test_csv", tmp_path / "x.csv"], check=False, timeout=120)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and r.stderr.startswith("error: "), r.stderr
