"""A phone n-gram language model for the attention beam search (shallow fusion).

Phone sequences of a language are far from random (phonotactics), and a TTS corpus' training transcripts hold
plenty of them even when the test sentences are new. :class:`PhoneNgramLM` is an interpolated absolute-discounting
n-gram model (order 1-3) over the model's token ids, estimated from the training manifest's ``phn`` column in a
fraction of a second; :class:`PhoneNgramScorer` plugs it into SpeechBrain's ``S2SRNNBeamSearcher`` as a full
scorer, so hypothesis scores get ``lm_weight * log P(token | previous tokens)`` (end of sentence included).
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Sequence

import torch

from common.vocab import BOS_ID, EOS_ID

from speechbrain.decoders.scorer import BaseScorerInterface, ScorerBuilder


class PhoneNgramLM:
    """``table[a, b, c] = log P(c | a, b)`` (for order 2 ``a`` is ignored, for order 1 ``a`` and ``b``): a dense
    [V, V, V] tensor (V ~ 50-200 phone tokens: at most a few MB)."""

    def __init__(self, table: torch.Tensor, order: int):
        self.table, self.order = table, order

    @classmethod
    def fit(cls, sequences: Iterable[Sequence[int]], vocab_size: int, order: int = 3, discount: float = 0.5,
            bos: int = BOS_ID, eos: int = EOS_ID) -> "PhoneNgramLM":
        """Estimate from token-id sequences (without BOS/EOS; they are added). Interpolated absolute discounting
        down to a uniform distribution over the vocabulary, so every token keeps a probability > 0."""
        if order not in (1, 2, 3):
            raise ValueError(f"n-gram order must be 1, 2 or 3, got {order}")
        V = vocab_size
        c1 = torch.zeros(V, dtype=torch.float64)
        c2 = torch.zeros(V, V, dtype=torch.float64)
        c3 = torch.zeros(V, V, V, dtype=torch.float64)
        n = 0
        for seq in sequences:
            s = [bos, bos, *map(int, seq), eos]
            for k in range(2, len(s)):
                c1[s[k]] += 1
                c2[s[k - 1], s[k]] += 1
                c3[s[k - 2], s[k - 1], s[k]] += 1
            n += 1
        if n == 0:
            raise ValueError("no training sequences for the phone LM")

        def smooth(counts: torch.Tensor, lower: torch.Tensor) -> torch.Tensor:
            total = counts.sum(-1, keepdim=True)
            types = (counts > 0).sum(-1, keepdim=True).double()
            seen = total > 0
            p = (counts - discount).clamp_min(0) / total.clamp_min(1) + discount * types / total.clamp_min(1) * lower
            return torch.where(seen, p, lower.expand_as(p))

        p1 = smooth(c1, torch.full((V,), 1.0 / V, dtype=torch.float64))
        p2 = smooth(c2, p1[None, :])
        p3 = smooth(c3, p2[None, :, :]) if order == 3 else None
        if order == 1:
            table = p1.expand(V, V, V)
        elif order == 2:
            table = p2[None].expand(V, V, V)
        else:
            table = p3
        return cls(table.log().float().contiguous(), order)

    @classmethod
    def from_manifest(cls, csv_path: Path, vocab, order: int = 3) -> "PhoneNgramLM":
        """Fit on the ``phn`` column of a SpeechBrain manifest (the training split)."""
        from common.io import read_manifest

        seqs = [vocab.encode(r.get("phn") or "", where=f"{csv_path} (ID {r['ID']})") for r in read_manifest(csv_path)]
        return cls.fit([s for s in seqs if s], len(vocab), order)

    @classmethod
    def from_run(cls, run: Path, vocab, order: int = 3) -> "PhoneNgramLM":
        """Fit on the training transcripts a run folder keeps (``train_phonemes.txt``, common/run_folder.py)."""
        from common.run_folder import TRAIN_PHONEMES_FILE, train_phonemes

        where = Path(run) / TRAIN_PHONEMES_FILE
        seqs = [vocab.encode(row, where=f"{where}:{n}") for n, row in enumerate(train_phonemes(run), 1)]
        return cls.fit([s for s in seqs if s], len(vocab), order)

    def logprob(self, seq: Sequence[int], bos: int = BOS_ID, eos: int = EOS_ID) -> float:
        """Total log-probability of a sequence (with its end of sentence)."""
        s = [bos, bos, *map(int, seq), eos]
        return float(sum(self.table[s[k - 2], s[k - 1], s[k]] for k in range(2, len(s))))


class PhoneNgramScorer(BaseScorerInterface):
    """Full scorer for ``S2SRNNBeamSearcher``: memory = the token before the last one of each hypothesis."""

    def __init__(self, lm: PhoneNgramLM, bos: int = BOS_ID):
        self.lm, self.bos = lm, bos

    def score(self, inp_tokens, memory, candidates, attn):
        table = self.lm.table.to(inp_tokens.device)
        prev = memory if memory is not None else torch.full_like(inp_tokens, self.bos)
        return table[prev, inp_tokens], inp_tokens

    def permute_mem(self, memory, index):
        return memory[index]

    def reset_mem(self, x, enc_lens):
        return None


class PhoneScorerBuilder(ScorerBuilder):
    """SpeechBrain's ``ScorerBuilder`` that also accepts the ``phonengram`` weight (it only knows the scorers
    defined in its own module)."""

    def _validate_scorer(self, scorer_names):
        super()._validate_scorer(list(scorer_names) + ["phonengram"])
