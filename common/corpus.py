"""Readers for every supported corpus format -> a list of ``Record`` (one utterance each).

Formats (``make_manifests.py --format``):
- ``matcha``: ``metadata.csv`` lines ``rel_path|spk_id|language|text``, audio at ``wavs/{rel_path}.wav``;
- ``auxasr``: StyleTTS2/AuxiliaryASR lists ``path.wav|phonemes|speaker`` (phonemes given);
- ``ljspeech``: ``metadata.csv`` lines ``id|text|normalized_text``, audio at ``wavs/{id}.wav``;
- ``commonvoice``: ``train.tsv``/``dev.tsv``/``test.tsv`` (header row) with audio in ``clips/``;
- ``hf``: a Hugging Face dataset (``save_to_disk`` folder or hub name); audio is written once to WAV.

Structural problems (wrong field count, duplicate id, a path leaving the corpus) raise ``UserError`` naming
file:line. Audio problems are not checked here; ``make_manifests`` counts them.
"""
from __future__ import annotations

import csv
import os
from dataclasses import dataclass, field
from pathlib import Path

from common.io import UserError, safe_join

FORMATS = ("matcha", "auxasr", "ljspeech", "commonvoice", "hf")


@dataclass
class Record:
    id: str
    wav: Path
    spk_id: str
    language: str
    text: str
    where: str  # file:line, for messages
    phn: list[str] | None = None  # phonemes given by the corpus (auxasr)
    split: str | None = None  # split given by the corpus (commonvoice / auxasr lists)
    extra: dict = field(default_factory=dict)


def _lines(path: Path):
    if not path.is_file():
        raise UserError(f"{path}: file not found; point --corpus at the corpus folder (or give --metadata)")
    with open(path, encoding="utf-8-sig") as fh:
        for n, line in enumerate(fh, 1):
            line = line.rstrip("\r\n")
            if line.strip():
                yield n, line


def _fields(line: str, n_expected: int, where: str, layout: str) -> list[str]:
    parts = line.split("|")
    if len(parts) != n_expected:
        raise UserError(
            f"{where}: expected {n_expected} '|'-separated fields ({layout}), found {len(parts)}; "
            f"fix the row (a '|' inside the text is not allowed)"
        )
    return [p.strip() for p in parts]


def _check_unique(records: list[Record]) -> list[Record]:
    seen: dict[str, str] = {}
    for r in records:
        if r.id in seen:
            raise UserError(f"{r.where}: duplicate id {r.id!r} (first at {seen[r.id]}); "
                            "each utterance needs a unique path")
        seen[r.id] = r.where
    return records


def read_matcha(corpus: Path, metadata: Path | None, wav_dir: Path | None, language: str) -> list[Record]:
    metadata = metadata or corpus / "metadata.csv"
    wav_dir = wav_dir or corpus / "wavs"
    out = []
    for n, line in _lines(metadata):
        where = f"{metadata}:{n}"
        rel, spk, lang, text = _fields(line, 4, where, "rel_path|spk_id|language|text")
        rel = rel[:-4] if rel.lower().endswith(".wav") else rel
        wav = safe_join(wav_dir, rel, where).with_name(Path(rel).name + ".wav")
        out.append(Record(rel, wav, spk or "0", lang or language, text, where))
    return _check_unique(out)


def read_ljspeech(corpus: Path, metadata: Path | None, wav_dir: Path | None, language: str) -> list[Record]:
    metadata = metadata or corpus / "metadata.csv"
    wav_dir = wav_dir or corpus / "wavs"
    out = []
    for n, line in _lines(metadata):
        where = f"{metadata}:{n}"
        uid, text, norm = _fields(line, 3, where, "id|text|normalized_text")
        wav = safe_join(wav_dir, uid, where).with_name(Path(uid).name + ".wav")
        out.append(Record(uid, wav, "0", language, norm or text, where))
    return _check_unique(out)


def read_auxasr(corpus: Path, lists: list[Path], wav_dir: Path | None, language: str) -> list[Record]:
    """AuxiliaryASR lists; ``corpus`` may be one list file or a folder with train_list.txt / val_list.txt."""
    if not lists:
        if corpus.is_file():
            lists = [corpus]
        else:
            lists = [p for p in (corpus / "train_list.txt", corpus / "val_list.txt", corpus / "test_list.txt")
                     if p.is_file()]
            if not lists:
                raise UserError(f"{corpus}: no train_list.txt / val_list.txt found; give --metadata LIST.txt")
    split_of = {"train_list.txt": "train", "val_list.txt": "valid", "test_list.txt": "test"}
    from common.g2p import ipa_to_tokens

    out = []
    for lst in lists:
        base = wav_dir or lst.parent
        split = split_of.get(lst.name) if len(lists) > 1 else None
        for n, line in _lines(lst):
            where = f"{lst}:{n}"
            path, phonemes, spk = _fields(line, 3, where, "path.wav|phonemes|speaker")
            wav = safe_join(base, path, where)
            rel = path[:-4] if path.lower().endswith(".wav") else path
            toks = ipa_to_tokens(phonemes)
            out.append(Record(rel, wav, spk or "0", language, phonemes, where, phn=toks, split=split))
    return _check_unique(out)


def read_commonvoice(corpus: Path, wav_dir: Path | None, language: str) -> list[Record]:
    clips = wav_dir or corpus / "clips"
    split_of = {"train.tsv": "train", "dev.tsv": "valid", "test.tsv": "test"}
    present = [f for f in split_of if (corpus / f).is_file()]
    if not present:
        raise UserError(f"{corpus}: none of train.tsv, dev.tsv, test.tsv found; "
                        "point --corpus at the Common Voice language folder")
    out = []
    for name in present:
        tsv = corpus / name
        with open(tsv, encoding="utf-8", newline="") as fh:
            reader = csv.DictReader(fh, delimiter="\t", quoting=csv.QUOTE_NONE)
            missing = {"path", "sentence"} - set(reader.fieldnames or [])
            if missing:
                raise UserError(f"{tsv}: missing column(s) {', '.join(sorted(missing))}; is this a Common Voice TSV?")
            for n, row in enumerate(reader, 2):
                where = f"{tsv}:{n}"
                if None in row or any(v is None for v in row.values()):
                    raise UserError(f"{where}: wrong number of tab-separated fields; fix or remove the row")
                wav = safe_join(clips, row["path"], where)
                uid = os.path.splitext(row["path"])[0]
                lang = (row.get("locale") or "").strip() or language
                out.append(Record(uid, wav, row.get("client_id") or "0", lang, row["sentence"], where,
                                  split=split_of[name]))
    return _check_unique(out)


def _hf_token() -> str | None:
    tok = os.environ.get("HF_TOKEN")
    if tok:
        return tok
    from dotenv import dotenv_values

    for env in (Path.cwd() / ".env",):
        if env.is_file():
            tok = dotenv_values(env).get("HF_TOKEN")
            if tok:
                return tok
    return None


def _is_gated_error(err: Exception) -> bool:
    text = f"{type(err).__name__} {err}".lower()
    return any(k in text for k in ("gated", "401", "403", "unauthorized", "authentication", "access to dataset"))


def read_hf(source: str, out_dir: Path, config: str | None, split: str | None, audio_col: str, text_col: str | None,
            speaker_col: str | None, language: str) -> list[Record]:
    """A HF dataset: a local ``save_to_disk`` folder or a hub name. Audio is written once to ``out_dir/wavs``."""
    import datasets
    import numpy as np

    from common.audio import write_wav

    token = _hf_token()
    src = Path(source)
    try:
        if src.is_dir():
            ds = datasets.load_from_disk(str(src))
            if isinstance(ds, datasets.DatasetDict):
                if split is None and len(ds) > 1:
                    raise UserError(f"{source}: dataset has splits {list(ds)}; choose one with --hf_split")
                ds = ds[split or next(iter(ds))]
        else:
            ds = datasets.load_dataset(source, config, split=split or "train", token=token)
    except UserError:
        raise
    except Exception as err:  # datasets raises many types; map the ones a user can fix
        if _is_gated_error(err):
            hint = "the token in HF_TOKEN was refused" if token else "no HF_TOKEN found in the environment or .env"
            raise UserError(f"{source}: dataset is gated or private ({hint}); accept its terms on the hub and set "
                            f"HF_TOKEN=... in the environment or a .env file") from None
        raise UserError(f"{source}: cannot load Hugging Face dataset "
                        f"({type(err).__name__}: {str(err)[:200]})") from None
    cols = ds.column_names
    if audio_col not in cols:
        raise UserError(f"{source}: no audio column {audio_col!r} (columns: {cols}); set --hf_audio_column")
    if text_col is None:
        text_col = next((c for c in ("normalized_text", "text", "sentence", "transcription") if c in cols), None)
    if text_col not in cols:
        raise UserError(f"{source}: no text column (columns: {cols}); set --hf_text_column")
    if speaker_col and speaker_col not in cols:
        raise UserError(f"{source}: no speaker column {speaker_col!r} (columns: {cols}); fix --hf_speaker_column")
    ds = ds.cast_column(audio_col, datasets.Audio(decode=False))
    wav_root = out_dir / "wavs"
    out = []
    from tqdm import tqdm

    import io as _io

    import soundfile as sf

    for i, row in enumerate(tqdm(ds, desc="hf audio", unit="utt")):
        where = f"{source}[{i}]"
        audio = row[audio_col] or {}
        name = Path(audio.get("path") or f"{i:08d}").stem or f"{i:08d}"
        uid = f"{i:08d}_{name}"
        wav = wav_root / f"{uid}.wav"
        if not wav.is_file():
            try:
                if audio.get("bytes"):
                    data, sr = sf.read(_io.BytesIO(audio["bytes"]), dtype="float32", always_2d=True)
                elif audio.get("path") and Path(audio["path"]).is_file():
                    data, sr = sf.read(audio["path"], dtype="float32", always_2d=True)
                else:
                    data = None
            except (sf.LibsndfileError, RuntimeError) as err:
                raise UserError(f"{where}: audio cannot be decoded ({err})") from None
            if data is not None:
                write_wav(wav, np.asarray(data.mean(axis=1)), sr)
        spk = str(row[speaker_col]) if speaker_col else "0"
        out.append(Record(uid, wav, spk, language, str(row[text_col] or ""), where))
    return _check_unique(out)


def read_corpus(fmt: str, corpus: Path, *, metadata: Path | None = None, wav_dir: Path | None = None,
                language: str = "en-us", out_dir: Path | None = None, hf: dict | None = None) -> list[Record]:
    if fmt not in FORMATS:
        raise UserError(f"unknown --format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if fmt != "hf" and not corpus.exists():
        raise UserError(f"{corpus}: corpus not found; check --corpus")
    if fmt == "matcha":
        return read_matcha(corpus, metadata, wav_dir, language)
    if fmt == "ljspeech":
        return read_ljspeech(corpus, metadata, wav_dir, language)
    if fmt == "auxasr":
        return read_auxasr(corpus, [metadata] if metadata else [], wav_dir, language)
    if fmt == "commonvoice":
        return read_commonvoice(corpus, wav_dir, language)
    hf = hf or {}
    return read_hf(str(corpus), out_dir, hf.get("config"), hf.get("split"), hf.get("audio_column", "audio"),
                   hf.get("text_column"), hf.get("speaker_column"), language)


def read_phones_tsv(path: Path) -> dict[str, tuple[list[str], list[float]]]:
    """``rel_path<TAB>phones<TAB>end times`` -> {rel_path: (phones, end_times)}."""
    out = {}
    for n, line in _lines(path):
        where = f"{path}:{n}"
        parts = line.split("\t")
        if len(parts) != 3:
            raise UserError(f"{where}: expected 'rel_path<TAB>phones<TAB>end_times', found {len(parts)} field(s)")
        phones, times = parts[1].split(), parts[2].split()
        if len(phones) != len(times) or not phones:
            raise UserError(f"{where}: {len(phones)} phones but {len(times)} end times; they must match one to one")
        try:
            ends = [float(t) for t in times]
        except ValueError:
            raise UserError(f"{where}: end times must be numbers in seconds") from None
        if parts[0] in out:
            raise UserError(f"{where}: duplicate rel_path {parts[0]!r}")
        out[parts[0]] = (phones, ends)
    return out
