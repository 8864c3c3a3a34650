"""What the recognizer's tokens are (``make_manifests.py --tokenizer_type``), and how the export turns them into the
symbols the TTS model is fed.

- ``phoneme`` (the default): IPA characters from the G2P (or the phones of ``--phones_tsv``), ``common/g2p.py``.
- ``char``: the characters of the text after a cleaner (``basic_cleaner``: lower case, whitespace collapsed, every
  other character kept, punctuation included, as Matcha's ``basic_cleaners`` without its transliteration; or your
  own ``--g2p module:function``), the space written ``|`` (``common.vocab.WORD_SEP``). For TTS models fed
  characters, and languages without a G2P. The cleaner is the G2P of this unit type: the run folder records it, so
  the export cleans the text the same way.
- ``spm``: SentencePiece pieces of the cleaned text (a unigram model trained on the training split by the
  ``sentencepiece`` package, ``--spm_vocab_size``; or a given ``--spm_model``), saved as ``spm.model`` in the
  manifest folder and in the run folder. A piece's *symbols* are its characters with the word marker ``▁`` read as
  the space ``|``, except the marker SentencePiece puts in front of the first word (no character of the text); the
  symbols of an utterance's pieces are exactly its ``char`` tokens.

Durations are always per symbol of the sequence the TTS model is fed: per phoneme, per character, and with ``spm``
per character too: the recognizer aligns pieces (first pass), each piece's span is divided evenly among its symbols
(``SubwordExpander``), and the refinement (whose classes are then the symbols, ``symbol_vocab``) places the symbol
boundaries.
"""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import numpy as np

from common import frames as F
from common.io import UserError
from common.vocab import SPECIALS, WORD_SEP, Vocab

UNIT_TYPES = ("phoneme", "char", "spm")
CHAR_CLEANER = "common.units:basic_cleaner"  # the default --g2p of the char and spm unit types
SPM_FILE = "spm.model"  # in the manifest folder and in the run folder
SPM_MARK = "\u2581"  # SentencePiece's word-boundary marker
RATE_NAMES = {"phoneme": "PER", "char": "CER", "spm": "piece error rate"}  # the error rate over the model's units
TASKS = {"phoneme": "phoneme_recognition", "char": "character_recognition", "spm": "subword_recognition"}
GRID_S = 0.001  # the frame grid of divided piece spans (the fused boundaries' grid, common/refine.py)


def basic_cleaner(text: str) -> str:
    """Lower case, whitespace runs collapsed to one space, stripped; every other character is kept."""
    return re.sub(r"\s+", " ", text.lower()).strip()


def check_type(unit_type: str) -> str:
    if unit_type not in UNIT_TYPES:
        raise UserError(f"--tokenizer_type must be one of {', '.join(UNIT_TYPES)}, got {unit_type!r}")
    return unit_type


def chars_of(text: str) -> list[str]:
    """``char`` tokens of a cleaned text: one per character, a whitespace run -> ``|``."""
    from common.g2p import ipa_to_tokens

    return ipa_to_tokens(text)


# --------------------------------------------------------------------------------------------------------------------
# SentencePiece
# --------------------------------------------------------------------------------------------------------------------
def train_spm(texts: list[str], out: Path, vocab_size: int) -> int:
    """A unigram SentencePiece model of ``texts`` (cleaned), written to ``out``; returns its piece count.
    ``identity`` normalization (the pieces spell the cleaned text exactly), every character covered, no BOS/EOS;
    ``vocab_size`` is an upper bound (a small corpus gets fewer pieces)."""
    import io

    import sentencepiece as spm

    from common.io import atomic_path

    if vocab_size < 2:
        raise UserError(f"--spm_vocab_size must be >= 2, got {vocab_size}")
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise UserError("no training text to train the SentencePiece model on")
    buf = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(sentence_iterator=iter(texts), model_writer=buf, vocab_size=int(vocab_size),
                                       model_type="unigram", character_coverage=1.0,
                                       normalization_rule_name="identity", hard_vocab_limit=False, bos_id=-1,
                                       eos_id=-1, unk_id=0, minloglevel=2, num_threads=1)
    except RuntimeError as err:
        raise UserError(f"SentencePiece training failed ({str(err).splitlines()[0][:200]}); change "
                        f"--spm_vocab_size") from None
    with atomic_path(Path(out)) as tmp:
        tmp.write_bytes(buf.getvalue())
    return SpmTokenizer(out).size


class SpmTokenizer:
    """A SentencePiece model: cleaned text -> pieces, pieces -> symbols."""

    def __init__(self, path: Path):
        import sentencepiece as spm

        self.path = Path(path)
        if not self.path.is_file():
            raise UserError(f"{self.path}: SentencePiece model not found; give --spm_model FILE.model (or let "
                            f"make_manifests.py train one with --tokenizer_type spm)")
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.load(str(self.path))
        except (OSError, RuntimeError):
            raise UserError(f"{self.path}: not a SentencePiece model (sentencepiece cannot load it)") from None
        self.size = self.sp.get_piece_size()

    def encode(self, text: str, where: str = "") -> list[str]:
        """Pieces of a cleaned text; an error when they do not spell it (a model that normalizes text)."""
        pieces = self.sp.encode(text, out_type=str)
        if symbols_of_pieces(pieces)[0] != chars_of(text):
            spelled = "".join(pieces).replace(SPM_MARK, " ").strip()
            raise UserError(f"{where + ': ' if where else ''}the pieces of {self.path} spell {spelled!r}, not the "
                            f"text {text!r} (the model normalizes text); train it with "
                            f"normalization_rule_name=identity, or let make_manifests.py train one")
        return pieces


def piece_symbols(piece: str) -> list[str]:
    """A piece's symbols: its characters, the marker ``▁`` read as the space ``|``."""
    return [WORD_SEP if ch == SPM_MARK else ch for ch in piece]


def symbols_of_pieces(pieces: list[str]) -> tuple[list[str], list[int]]:
    """(symbols, the piece each comes from) of an utterance's pieces: the marker in front of the first word is no
    character of the text and is dropped; runs of markers become one ``|``."""
    syms, owner = [], []
    for k, p in enumerate(pieces):
        for s in piece_symbols(p):
            if s == WORD_SEP and (not syms or syms[-1] == WORD_SEP):
                continue
            syms.append(s)
            owner.append(k)
    while syms and syms[-1] == WORD_SEP:
        syms.pop()
        owner.pop()
    return syms, owner


def detokenize(tokens: list[str], unit_type: str) -> str:
    """The text a token sequence spells (``char``: ``|`` -> space; ``spm``: pieces joined, ``▁`` -> space)."""
    if unit_type == "spm":
        return "".join(tokens).replace(SPM_MARK, " ").strip()
    return " ".join("".join(tokens).split(WORD_SEP)).strip() if unit_type == "char" else " ".join(tokens)


def symbol_vocab(piece_vocab: Vocab) -> Vocab:
    """The symbols of every piece of a model's vocabulary (the specials first): the classes of the refinement."""
    chars = set()
    for t in piece_vocab.tokens[len(SPECIALS):]:
        chars.update(piece_symbols(t))
    return Vocab(SPECIALS + sorted(chars - set(SPECIALS)))


# --------------------------------------------------------------------------------------------------------------------
# What a run folder says, and what the export does with it
# --------------------------------------------------------------------------------------------------------------------
def run_units(run: Path) -> dict:
    """``{"units": type, "spm_model": path or None}`` of a run folder (``phonemes.json``; runs that predate unit
    types are ``phoneme``)."""
    import json

    from common.run_folder import PHONEMES_FILE

    path = Path(run) / PHONEMES_FILE
    src = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    unit_type = src.get("units") or "phoneme"
    spm_model = Path(run) / src["spm_model"] if src.get("spm_model") else None
    if unit_type == "spm" and (spm_model is None or not spm_model.is_file()):
        raise UserError(f"{run}: a SentencePiece run without its {SPM_FILE}; copy it back from the manifests, or "
                        f"retrain")
    return {"units": unit_type, "spm_model": spm_model}


def text_tokenizer(src: dict):
    """``f(text, where) -> tokens`` for the G2P's output (phonemes, or cleaned text): one token per character
    (``phoneme``, ``char``) or its pieces (``spm``)."""
    from common.g2p import ipa_to_tokens

    if src.get("units") == "spm":
        sp = SpmTokenizer(src["spm_model"])
        return lambda text, where="": sp.encode(text, where)
    return lambda text, where="": ipa_to_tokens(text)


def symbols_of(tokens: list[str], src: dict) -> list[str]:
    """The symbols the TTS model is fed for a row's tokens (``spm``: the pieces' characters)."""
    return symbols_of_pieces(tokens)[0] if src.get("units") == "spm" else tokens


class ExportUnits:
    """The export's unit handling (``phoneme`` and ``char``: nothing to do). ``spm``: after the first pass each
    piece's span is divided evenly among its symbols (``expand``), so everything after it (refinement, calibration,
    Matcha durations) works on symbols, with ``vocab`` (``symbol_vocab``) as the refinement's classes."""

    def __init__(self, src: dict, model_vocab):
        self.subword = src.get("units") == "spm"
        self.vocab = symbol_vocab(model_vocab) if self.subword else model_vocab
        self._items: dict = {}

    def item(self, it):
        """A row's ``Item`` with the symbols as its tokens (the pieces' ``Item`` as it is for other unit types)."""
        if not self.subword:
            return it
        key = (it.rel, it.span)
        if key not in self._items:
            syms, _ = symbols_of_pieces(it.tokens)
            self._items[key] = dataclasses.replace(it, tokens=syms, ids=self.vocab.encode(syms, it.where))
        return self._items[key]

    def expand(self, rows: list) -> None:
        """Replace, in place, each first-pass ``Alignment`` over pieces by one over symbols: a piece's span is
        divided evenly among its symbols (on a 1 ms grid), its CTC confidence repeated; a piece without symbols
        (the first word's marker standing alone) gives its span to the next piece (the last one: to the one
        before)."""
        if not self.subword:
            return
        for a in rows:
            self._expand(a)

    def _expand(self, a) -> None:
        it = a.item
        syms, owner = symbols_of_pieces(it.tokens)
        ends = a.unit_ends()
        off = 1 if a.lead else 0
        piece_end = ends[off: off + len(it.tokens)]
        piece_start = np.concatenate([[ends[off - 1] if off else 0.0], piece_end[:-1]])
        owned = np.bincount(owner, minlength=len(it.tokens))
        # a piece without symbols: its start moves to the next piece that has some (or its end to the one before)
        for k in range(len(it.tokens)):
            if owned[k] == 0:
                nxt = next((j for j in range(k + 1, len(it.tokens)) if owned[j]), None)
                if nxt is not None:
                    piece_start[nxt] = min(piece_start[nxt], piece_start[k])
                else:
                    prv = max(j for j in range(k) if owned[j])
                    piece_end[prv] = max(piece_end[prv], piece_end[k])
        sym_ends, conf, seen = [], [], np.zeros(len(it.tokens), dtype=np.int64)
        for s, k in zip(syms, owner):
            seen[k] += 1
            sym_ends.append(piece_start[k] + (piece_end[k] - piece_start[k]) * seen[k] / owned[k])
            conf.append(a.confidence[k])
        new_ends = np.concatenate([ends[:off], sym_ends, ends[off + len(it.tokens):]])
        a.item = self.item(it)
        a.units = ([a.units[0]] if a.lead else []) + list(a.item.tokens) + ([a.units[-1]] if a.trail else [])
        a.frames = F.ends_to_counts(new_ends, int(round(it.duration_s / GRID_S)), GRID_S)
        a.hop_s = GRID_S
        a.confidence = np.asarray(conf, dtype=np.float64)
