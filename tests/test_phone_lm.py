"""The phone n-gram LM (common/phone_lm.py) and its use in the attention beam search (recipes/decode.py)."""
from __future__ import annotations

import sys

import pytest
import torch

from common.phone_lm import PhoneNgramLM, PhoneNgramScorer
from common.vocab import BOS_ID, EOS_ID
from tests.test_decode import _restore_torch_threads, decode, decode_csv  # noqa: F401  (fixtures)
from tests.utils import one_line_error, run, ROOT

V = 9  # 4 specials + 5 phones (ids 4..8)


@pytest.mark.parametrize("order", [1, 2, 3])
def test_distributions_are_normalized(order):
    lm = PhoneNgramLM.fit([[4, 5, 6], [4, 5, 7], [8, 8, 4, 5, 6]], V, order)
    p = lm.table.exp()
    assert lm.table.shape == (V, V, V) and torch.allclose(p.sum(-1), torch.ones(V, V), atol=1e-5)
    assert bool((p > 0).all())  # smoothing leaves no zero


def test_trigram_follows_the_data():
    seqs = [[4, 5, 6]] * 20 + [[7, 5, 8]] * 20
    lm = PhoneNgramLM.fit(seqs, V, 3)
    t = lm.table
    assert t[4, 5, 6] > t[4, 5, 8] + 2 and t[7, 5, 8] > t[7, 5, 6] + 2  # the context two back decides
    assert t[BOS_ID, BOS_ID, 4] > t[BOS_ID, BOS_ID, 5] + 2  # sentence starts
    assert t[5, 6, EOS_ID] > t[5, 6, 4] + 2  # and ends
    big = PhoneNgramLM.fit(seqs, V, 2)
    assert abs(float(big.table[4, 5, 6] - big.table[7, 5, 6])) < 1e-6  # a bigram ignores it
    assert lm.logprob([4, 5, 6]) > lm.logprob([4, 5, 8]) + 2
    with pytest.raises(ValueError):
        PhoneNgramLM.fit([], V, 3)
    with pytest.raises(ValueError):
        PhoneNgramLM.fit(seqs, V, 4)


def test_scorer_memory_follows_the_beam():
    lm = PhoneNgramLM.fit([[4, 5, 6]] * 5 + [[7, 5, 8]] * 5, V, 3)
    sc = PhoneNgramScorer(lm)
    inp = torch.tensor([BOS_ID, BOS_ID])
    s0, mem = sc.score(inp, sc.reset_mem(None, None), None, None)
    assert torch.equal(s0, lm.table[BOS_ID, BOS_ID].expand(2, V))
    s1, mem = sc.score(torch.tensor([4, 7]), mem, None, None)
    mem = sc.permute_mem(mem, torch.tensor([1, 0]))  # the beam swaps its hypotheses
    s2, _ = sc.score(torch.tensor([5, 5]), mem, None, None)
    assert torch.equal(s2[0], lm.table[7, 5]) and torch.equal(s2[1], lm.table[4, 5])


def _mean_lm_logprob(recs, lm, vocab) -> float:
    tot = n = 0
    for r in recs:
        ids = vocab.encode(r["hyp"].split())
        tot, n = tot + lm.logprob(ids), n + len(ids) + 1
    return tot / n


def test_decode_with_the_lm(tiny_model, decode_csv, tmp_path, capsys):  # noqa: F811
    from common.vocab import Vocab
    from recipes.decode import build_phone_lm

    tokens = [ln.split("\t")[0] for ln in (tiny_model / "tokens.txt").read_text(encoding="utf-8").splitlines()]
    vocab = Vocab(tokens)
    lm = build_phone_lm(tiny_model, vocab, None, 3)  # fitted on the model's own train.csv
    off, _ = decode(tiny_model, decode_csv, tmp_path / "off.jsonl", "--decoder", "attention", "--lm_weight", 0,
                    "--beam_size", 4)
    on, text = decode(tiny_model, decode_csv, tmp_path / "on.jsonl", "--decoder", "attention", "--lm_weight", 3,
                      "--beam_size", 4, capsys=capsys)
    assert "phone-LM (order 3) weight 3" in text.out
    # a heavy LM weight pulls the hypotheses toward what the LM finds likely
    assert _mean_lm_logprob(on, lm, vocab) > _mean_lm_logprob(off, lm, vocab) + 0.1
    assert [r["id"] for r in on] == [r["id"] for r in off]


def test_lm_bad_options_are_one_line_errors(tiny_model, decode_csv, tmp_path):  # noqa: F811
    base = [sys.executable, ROOT / "recipes/decode.py", "hparams/phoneme.yaml", "--model_dir", tiny_model, "--test_csv",
            decode_csv, "--output", tmp_path / "x.jsonl"]
    one_line_error(run([*base, "--decoder", "ctc_greedy", "--lm_weight", 0.5], check=False), "--decoder attention")
    one_line_error(run([*base, "--decoder", "attention", "--lm_order", 5], check=False), "--lm_order")
    one_line_error(run([*base, "--decoder", "attention", "--lm_train_csv", tmp_path / "none.csv"], check=False),
                   "none.csv", "not found")
