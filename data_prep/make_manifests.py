#!/usr/bin/env python3
"""Corpus -> SpeechBrain manifests (train/valid/test.csv), tokens.txt and prep_report.json.

    python data_prep/make_manifests.py --corpus DIR --format matcha --out DIR [options]

See README.md ("make_manifests.py") for every option. Nothing is written until every row has been checked, so a
failed run leaves no half-written output.
"""
from __future__ import annotations

import argparse
import os
import random
import re
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.audio import audio_info  # noqa: E402
from common.corpus import FORMATS, Record, read_corpus, read_phones_tsv  # noqa: E402
from common.g2p import G2P, check_symbols, ipa_to_tokens, load_symbols  # noqa: E402
from common.io import UserError, cli, write_json, write_manifest  # noqa: E402
from common import units as U  # noqa: E402
from common.vocab import Vocab  # noqa: E402

SPLITS = ("train", "valid", "test")
MAX_SKIP_LINES = 20


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", required=True, type=Path, help="corpus folder (or HF dataset folder / hub name)")
    p.add_argument("--format", default="matcha", choices=FORMATS)
    p.add_argument("--out", required=True, type=Path, help="where train/valid/test.csv, tokens.txt go")
    p.add_argument("--metadata", type=Path, help="metadata/list file if not the format's default name")
    p.add_argument("--wav_dir", type=Path, help="audio folder if not the format's default")
    p.add_argument("--language", default="en-us", help="language for formats without a language column")
    p.add_argument("--phones_tsv", type=Path,
                   help="take each row's phones from this file (rel_path<TAB>phones<TAB>ends)")
    p.add_argument("--g2p", help="module:function(text, language) -> str (default: phonemizer espeak-ng)")
    p.add_argument("--symbols", help="module:attr ordered symbol list (e.g. matcha.text.symbols:symbols)")
    p.add_argument("--tokenizer_type", default="phoneme", choices=U.UNIT_TYPES,
                   help="the recognizer's units: phoneme (G2P), char (the cleaned text's characters) or spm "
                        "(SentencePiece pieces of the cleaned text); durations are per phoneme / per character")
    p.add_argument("--spm_vocab_size", type=int, default=100, help="pieces of the SentencePiece model trained on "
                   "the training split (an upper bound: a small corpus gets fewer)")
    p.add_argument("--spm_model", type=Path, help="use this SentencePiece model instead of training one")
    p.add_argument("--njobs", type=int, default=os.cpu_count() or 1, help="parallel phonemizer processes")
    # splits
    p.add_argument("--valid_fraction", type=float, default=0.05)
    p.add_argument("--test_fraction", type=float, default=0.05)
    p.add_argument("--split_by", choices=("text", "utterance", "speaker"), default="text",
                   help="unit kept whole in one split: 'text' keeps every reading of a sentence together")
    p.add_argument("--train_list", type=Path,
                   help="file of ids (one per line) for train; likewise --valid_list/--test_list")
    p.add_argument("--valid_list", type=Path)
    p.add_argument("--test_list", type=Path)
    p.add_argument("--ignore_format_splits", action="store_true", help="re-split corpora that come with splits")
    p.add_argument("--min_duration", type=float, default=0.0, help="seconds; shorter audio is skipped")
    p.add_argument("--max_duration", type=float, default=float("inf"), help="seconds; longer audio is skipped")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--strict", action="store_true", help="stop at the first skipped row instead of counting it")
    # hf
    p.add_argument("--hf_config")
    p.add_argument("--hf_split")
    p.add_argument("--hf_audio_column", default="audio")
    p.add_argument("--hf_text_column")
    p.add_argument("--hf_speaker_column")
    p.add_argument("--no_progress", action="store_true")
    a = p.parse_args(argv)
    for name in ("valid_fraction", "test_fraction"):
        if not 0.0 <= getattr(a, name) < 1.0:
            p.error(f"--{name} must be in [0, 1)")
    if a.valid_fraction + a.test_fraction >= 1.0:
        p.error("--valid_fraction + --test_fraction must be below 1")
    if a.min_duration > a.max_duration:
        p.error("--min_duration is larger than --max_duration")
    if a.tokenizer_type != "phoneme":
        if a.phones_tsv is not None:
            raise UserError(f"--phones_tsv gives phones: it goes with --tokenizer_type phoneme, not "
                            f"{a.tokenizer_type}; drop one of them")
        a.g2p = a.g2p or U.CHAR_CLEANER  # the text cleaner is the G2P of char / spm units (recorded, so the
        # export cleans the text the same way)
    if a.spm_model is not None:
        if a.tokenizer_type != "spm":
            raise UserError("--spm_model goes with --tokenizer_type spm; add it, or drop --spm_model")
        a.spm_model = a.spm_model.resolve()
    if a.phones_tsv is not None:
        a.phones_tsv = a.phones_tsv.resolve()  # recorded in prep_report.json; training copies the file into its run
    return a


class Skips:
    """Counted skips; with --strict the first one is an error."""

    def __init__(self, strict: bool):
        self.strict = strict
        self.counts: Counter = Counter()
        self.examples: dict[str, list[str]] = {}

    def add(self, reason: str, rec: Record, detail: str, fix: str) -> None:
        msg = f"{rec.where}: {detail}"
        if self.strict:
            raise UserError(f"{msg}; {fix} (or drop --strict to skip such rows)")
        self.counts[reason] += 1
        self.examples.setdefault(reason, [])
        if len(self.examples[reason]) < MAX_SKIP_LINES:
            self.examples[reason].append(msg)

    def print(self) -> None:
        for reason, n in sorted(self.counts.items()):
            print(f"skipped {n} row(s): {reason}")
            for ex in self.examples[reason][:5]:
                print(f"  {ex}")
            if n > 5:
                print(f"  ... and {n - 5} more (see prep_report.json)")


def check_audio(recs: list[Record], a, skips: Skips) -> list[tuple[Record, float]]:
    from tqdm import tqdm

    kept = []
    for r in tqdm(recs, desc="audio", unit="utt", disable=a.no_progress):
        if not r.wav.is_file():
            skips.add("missing_audio", r, f"audio file {r.wav} not found", "add the file or remove the row")
            continue
        try:
            n, sr = audio_info(r.wav)
        except UserError as err:
            skips.add("unreadable_audio", r, str(err), "re-encode the file as PCM WAV")
            continue
        if n == 0:
            skips.add("zero_length_audio", r, f"audio file {r.wav} has no samples",
                      "re-export the audio or remove the row")
            continue
        dur = n / sr
        if dur < a.min_duration or dur > a.max_duration:
            skips.add("duration_filtered", r, f"duration {dur:.2f}s outside [{a.min_duration}, {a.max_duration}]",
                      "change --min_duration/--max_duration")
            continue
        if not r.text.strip() and r.phn is None:
            skips.add("empty_text", r, "empty text", "write the transcript or remove the row")
            continue
        kept.append((r, dur))
    return kept


def phonemes(kept: list[tuple[Record, float]], a, skips: Skips) -> list[tuple[Record, float, list[str]]]:
    out = []
    if a.phones_tsv:
        table = read_phones_tsv(a.phones_tsv)
        for r, d in kept:
            if r.id not in table:
                skips.add("not_in_phones_tsv", r, f"no line for {r.id!r} in {a.phones_tsv}", "add its phones")
                continue
            out.append((r, d, table[r.id][0]))
        return out
    g2p = G2P(a.g2p, cache_file=a.out / ".g2p_cache.json", njobs=a.njobs)
    need = [(r, d) for r, d in kept if r.phn is None]
    for r, _ in need:
        g2p.check_language(r.language, r.where)
    ph = g2p.phonemize_all(((r.language, r.text) for r, _ in need), progress=not a.no_progress)
    a._g2p_cache_hits = g2p.hits
    for r, d in kept:
        toks = r.phn if r.phn is not None else ipa_to_tokens(ph[(r.language, r.text)])
        if not toks:
            skips.add("empty_phonemes", r, f"G2P gave no phonemes for {r.text!r}", "check the text and language")
            continue
        out.append((r, d, toks))
    return out


def _read_ids(path: Path) -> set[str]:
    if not path.is_file():
        raise UserError(f"{path}: split list not found")
    return {ln.strip() for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()}


def _group_key(r: Record, split_by: str) -> str:
    if split_by == "speaker":
        return r.spk_id
    if split_by == "text":
        return re.sub(r"[^\w]+", " ", r.text.lower()).strip() or r.id
    return r.id


def assign_splits(rows: list, a) -> dict[str, list]:
    rng = random.Random(a.seed)
    out = {s: [] for s in SPLITS}
    lists = {s: getattr(a, f"{s}_list") for s in SPLITS}
    if any(lists.values()):
        ids = {s: _read_ids(p) for s, p in lists.items() if p}
        for row in rows:
            for s in SPLITS:
                if row[0].id in ids.get(s, ()):
                    out[s].append(row)
                    break
        return out
    pending = []
    for row in rows:
        given = None if a.ignore_format_splits else row[0].split
        (out[given].append(row) if given else pending.append(row))
    fractions = {"test": a.test_fraction, "valid": a.valid_fraction}
    if any(out.values()):  # corpus has its own splits: only carve what it lacks from the rest
        fractions = {s: f for s, f in fractions.items() if not out[s]}
        pending += out["train"]
        out["train"] = []
    groups: dict[str, list] = {}
    for row in pending:
        groups.setdefault(_group_key(row[0], a.split_by), []).append(row)
    keys = sorted(groups)
    rng.shuffle(keys)
    total = len(pending)
    targets = {s: round(f * total) for s, f in fractions.items()}
    for s in ("test", "valid"):
        if fractions.get(s, 0) > 0 and targets[s] == 0 and total >= 3:
            targets[s] = 1
    for k in keys:
        for s in ("test", "valid"):
            if s in targets and len(out[s]) < targets[s]:
                out[s].extend(groups[k])
                break
        else:
            out["train"].extend(groups[k])
    return out


def subword_units(splits: dict, a) -> Path:
    """``--tokenizer_type spm``: every row's tokens become the pieces of its cleaned text (the char tokens), by a
    SentencePiece model trained on the training split's text (or ``--spm_model``); returns the model written to a
    temporary file in OUT (moved into place with the manifests)."""
    import shutil

    tmp = a.out / f".{U.SPM_FILE}.tmp"
    if a.spm_model is not None:
        U.SpmTokenizer(a.spm_model)  # a clear error when it is not one
        shutil.copyfile(a.spm_model, tmp)
    else:
        U.train_spm([U.detokenize(t, "char") for _, _, t in splits["train"]], tmp, a.spm_vocab_size)
    sp = U.SpmTokenizer(tmp)
    a._spm_pieces = sp.size
    try:
        for s in SPLITS:
            splits[s] = [(r, d, sp.encode(U.detokenize(t, "char"), r.where)) for r, d, t in splits[s]]
    except UserError:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


@cli
def main(argv=None) -> int:
    a = parse_args(argv)
    t0 = time.time()
    a.out.mkdir(parents=True, exist_ok=True)
    symbols = load_symbols(a.symbols)
    hf = {"config": a.hf_config, "split": a.hf_split, "audio_column": a.hf_audio_column,
          "text_column": a.hf_text_column, "speaker_column": a.hf_speaker_column}
    recs = read_corpus(a.format, a.corpus, metadata=a.metadata, wav_dir=a.wav_dir, language=a.language,
                       out_dir=a.out, hf=hf)
    if not recs:
        raise UserError(f"{a.corpus}: no rows found in the corpus")
    skips = Skips(a.strict)
    kept = check_audio(recs, a, skips)
    rows = phonemes(kept, a, skips)
    if symbols is not None:
        for r, _, toks in rows:
            check_symbols(toks, symbols, r.where)
    splits = assign_splits(rows, a)
    if not splits["train"]:
        raise UserError(f"{a.corpus}: no usable training rows (skipped: {dict(skips.counts)}); lower "
                        f"--valid_fraction/--test_fraction or use --split_by utterance")
    spm_tmp = subword_units(splits, a) if a.tokenizer_type == "spm" else None
    vocab = Vocab.build((" ".join(t) for s in SPLITS for _, _, t in splits[s]), symbols)

    def manifest_rows(items):
        for r, d, toks in items:
            yield {"ID": r.id, "wav": str(r.wav.resolve()), "duration": f"{d:.4f}", "spk_id": r.spk_id,
                   "language": r.language, "text": r.text, "phn": " ".join(toks)}

    counts = {s: write_manifest(a.out / f"{s}.csv", manifest_rows(splits[s])) for s in SPLITS}
    vocab.save(a.out / "tokens.txt")
    if spm_tmp is not None:
        spm_tmp.replace(a.out / U.SPM_FILE)
    report = {
        "corpus": str(a.corpus), "format": a.format, "rows_read": len(recs), "rows_written": sum(counts.values()),
        "splits": {s: {"rows": counts[s], "hours": round(sum(d for _, d, _ in splits[s]) / 3600, 4)} for s in SPLITS},
        "skipped": dict(skips.counts), "skipped_examples": skips.examples, "vocab_size": len(vocab),
        "phoneme_source": "phones_tsv" if a.phones_tsv else (a.g2p or "espeak"),
        "units": {"type": a.tokenizer_type, **({"spm_model": U.SPM_FILE, "spm_pieces": a._spm_pieces}
                                                if a.tokenizer_type == "spm" else {})},
        "g2p_cache_hits": getattr(a, "_g2p_cache_hits", 0),
        "languages": dict(Counter(r.language for r, _, _ in rows)), "speakers": len({r.spk_id for r, _, _ in rows}),
        "options": {k: (str(v) if isinstance(v, Path) else None if v == float("inf") else v)
                    for k, v in vars(a).items() if not k.startswith("_")},
        "seconds": round(time.time() - t0, 2),
    }
    write_json(a.out / "prep_report.json", report)
    skips.print()
    print(f"wrote {a.out}: train {counts['train']}, valid {counts['valid']}, test {counts['test']} rows; "
          f"{len(vocab)} tokens; skipped {sum(skips.counts.values())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
