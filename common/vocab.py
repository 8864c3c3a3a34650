"""The model vocabulary (``tokens.txt``) and the token conventions of the ``phn`` manifest column.

``phn`` holds space-separated tokens. With the default espeak G2P a token is one IPA character (as Matcha feeds its
encoder), and the word-boundary space is written as ``WORD_SEP`` (``|``). With ``--phones_tsv`` a token is a
festival phone name (``pau`` is silence).

``tokens.txt`` has one line per model token: ``token<TAB>model_id[<TAB>symbol_id]``. Ids 0..3 are the specials
(``<blank>`` for CTC, ``<unk>``, ``<bos>``, ``<eos>``); ``symbol_id`` is the token's index in the user's
``--symbols`` list (Matcha's ids) when one was given.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from common.io import UserError, atomic_write

WORD_SEP = "|"
SIL = "pau"  # silence: festival/MFA transcripts' pauses and the edge slots the aligner adds
SILENCE_TOKENS = frozenset({SIL, "sil", "sp", "<sil>"})  # transcript tokens read as silence
BLANK, UNK, BOS, EOS = "<blank>", "<unk>", "<bos>", "<eos>"
SPECIALS = [BLANK, UNK, BOS, EOS]
BLANK_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3


def special_id(name: str) -> int:
    """Model id of a special token by name (``blank``, ``unk``, ``bos``, ``eos``): fixed by tokens.txt's layout,
    which the yaml reads through this (``blank_index: !apply:common.vocab.special_id [blank]``)."""
    ids = {"blank": BLANK_ID, "unk": UNK_ID, "bos": BOS_ID, "eos": EOS_ID}
    if name not in ids:
        raise ValueError(f"no special token {name!r}; one of {', '.join(ids)}")
    return ids[name]


def token_to_symbol(token: str) -> str:
    """The character Matcha's symbol table uses for one of our tokens (``|`` -> space)."""
    return " " if token == WORD_SEP else token


def symbol_to_token(sym: str) -> str:
    return WORD_SEP if sym == " " else sym


@dataclass
class Vocab:
    tokens: list[str]
    symbol_ids: dict[str, int] = field(default_factory=dict)

    def __post_init__(self):
        self.index = {t: i for i, t in enumerate(self.tokens)}

    def __len__(self) -> int:
        return len(self.tokens)

    def encode(self, phn: str | list[str], where: str = "") -> list[int]:
        """Token ids for a ``phn`` string; an unknown token is a ``UserError`` naming it."""
        toks = phn.split() if isinstance(phn, str) else phn
        ids = []
        for t in toks:
            i = self.index.get(t)
            if i is None:
                loc = f"{where}: " if where else ""
                raise UserError(
                    f"{loc}token {t!r} is not in tokens.txt; re-run make_manifests.py so the vocabulary covers "
                    f"every split, or train with a tokens.txt that contains it"
                )
            ids.append(i)
        return ids

    def decode(self, ids) -> list[str]:
        return [self.tokens[int(i)] for i in ids if int(i) >= len(SPECIALS)]

    @classmethod
    def build(cls, phn_rows, symbols: list[str] | None = None) -> "Vocab":
        seen = set()
        for phn in phn_rows:
            seen.update(phn.split())
        tokens = SPECIALS + sorted(seen - set(SPECIALS))
        sym_ids = {}
        if symbols is not None:
            pos = {s: i for i, s in enumerate(symbols)}
            sym_ids = {t: pos[token_to_symbol(t)] for t in tokens[len(SPECIALS):] if token_to_symbol(t) in pos}
        return cls(tokens, sym_ids)

    def save(self, path: str | Path) -> None:
        with atomic_write(path) as fh:
            for i, t in enumerate(self.tokens):
                sid = self.symbol_ids.get(t)
                fh.write(f"{t}\t{i}" + (f"\t{sid}" if sid is not None else "") + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "Vocab":
        path = Path(path)
        if not path.is_file():
            raise UserError(f"{path}: tokens.txt not found; run data_prep/make_manifests.py first")
        tokens, sym_ids = [], {}
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            parts = line.split("\t")
            if len(parts) not in (2, 3) or not parts[1].isdigit() or int(parts[1]) != len(tokens):
                raise UserError(f"{path}:{n}: expected 'token<TAB>id[<TAB>symbol_id]' with ids 0,1,2,...; got {line!r}")
            tokens.append(parts[0])
            if len(parts) == 3 and parts[2]:
                sym_ids[parts[0]] = int(parts[2])
        if tokens[: len(SPECIALS)] != SPECIALS:
            raise UserError(f"{path}: the first tokens must be {' '.join(SPECIALS)}")
        return cls(tokens, sym_ids)
