#!/usr/bin/env python3
"""Decode phonemes with a trained recognizer and score them (PER; CER / WER for character and SentencePiece runs),
or print the phonemes of one audio file.

    python recipes/decode.py hparams/phoneme.yaml --test_csv MAN/test.csv [--model_dir OUT]
        [--decoder ctc_greedy|ctc_beam|attention] [--beam_size 8] [--ctc_weight 0.4]
        [--temperature 1.0] [--blank_penalty 0.0] [--insertion_bonus 0.0] [--lm_weight 0.4 --lm_order 3]
        [--batch_size 8] [--device cpu] [--num_threads N] [--output decode.jsonl] [--key value ...]
    python recipes/decode.py hparams/phoneme.yaml --model_dir OUT --audio file.wav

The model is the best checkpoint (lowest valid PER) of the training run's ``output_folder``: by default the one
the hparams file names, with ``--key value`` overrides applied the SpeechBrain way (``--seed 7``,
``--output_folder X``); ``--model_dir`` names it directly. ``data_folder`` defaults to the test_csv's folder.

The attention decoder adds a phone n-gram LM (``common/phone_lm.py``) fitted on the training manifest's phn
column (kept in the run folder as train_phonemes.txt), weight ``--lm_weight`` (default: the run's
``beam_lm_weight``; 0 turns it off).

Decoders and knobs: see ``common/decoding.py`` (``--beam_size`` / ``--ctc_weight`` default to the run's
``beam_size`` / ``beam_ctc_weight``). Writes ``decode.jsonl`` into the model folder (or ``--output``): one JSON
object per manifest row, in manifest order, ``{"id", "ref", "hyp", "per"}`` (tokens space-separated, ``per`` in %
= edits / reference tokens), and prints the corpus PER with substitutions / deletions / insertions. The rate follows
the run's unit type (``common/units.py``): ``per`` for phonemes; ``cer`` and ``wer`` for characters; ``piece_er``
(over the pieces), then ``cer`` and ``wer`` of the detokenized text for SentencePiece units.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from common import model as M  # noqa: E402
from common.decoding import DECODERS, DecodeOptions, PhonemeDecoder, length_sorted_batches  # noqa: E402
from common.io import UserError, atomic_write, cli, read_manifest  # noqa: E402
from common.units import run_units  # noqa: E402

OUTPUT_NAME = "decode.jsonl"


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("hparams", type=Path, help="the training hparams file (hparams/phoneme.yaml)")
    p.add_argument("--test_csv", type=Path, help="manifest to decode and score (ID,wav,duration,...,phn)")
    p.add_argument("--audio", type=Path, help="print the phonemes of this one audio file (any sample rate)")
    p.add_argument("--model_dir", type=Path, help="training output_folder (default: from the hparams file)")
    p.add_argument("--decoder", default="ctc_greedy", choices=DECODERS)
    p.add_argument("--beam_size", type=int, help="beam width (default: the run's beam_size)")
    p.add_argument("--ctc_weight", type=float, help="CTC prefix-score weight of --decoder attention "
                                                    "(default: the run's beam_ctc_weight)")
    p.add_argument("--temperature", type=float, default=1.0, help="divide logits by this before the softmax")
    p.add_argument("--blank_penalty", type=float, default=0.0, help="subtract from the CTC blank log-prob")
    p.add_argument("--insertion_bonus", type=float, default=0.0, help="add to the score per emitted token")
    p.add_argument("--lm_weight", type=float, help="weight of a phone n-gram LM in --decoder attention (default: the "
                   "run's beam_lm_weight); the LM is fitted on the training manifest's phn column")
    p.add_argument("--lm_order", type=int, help="phone LM order 1-3 (default: the run's lm_order)")
    p.add_argument("--lm_train_csv", type=Path, help="manifest to fit the phone LM on (default: the training "
                   "transcripts kept in the run folder)")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--num_threads", type=int, default=0,
                   help="torch CPU threads (0 = torch's default; 1 is much faster on a busy shared CPU)")
    p.add_argument("--output", type=Path, help=f"where to write the results (default: MODEL_DIR/{OUTPUT_NAME})")
    return p.parse_known_args(argv)


def resolve_model_dir(hparams_file: Path, extra: list[str], data_folder: Path) -> Path:
    """``output_folder`` of the hparams file with SpeechBrain-style ``--key value`` overrides (no objects built)."""
    import ruamel.yaml
    import speechbrain as sb
    from hyperpyyaml.core import resolve_references

    if not hparams_file.is_file():
        raise UserError(f"{hparams_file}: hparams file not found (or pass --model_dir)")
    _, _, overrides = sb.parse_arguments([str(hparams_file)] + list(extra))
    ov = ruamel.yaml.YAML(typ="safe").load(overrides) if overrides else {}
    ov = dict(ov or {})
    ov.setdefault("data_folder", str(data_folder))
    try:
        with open(hparams_file, encoding="utf-8") as fh:
            resolved = resolve_references(fh, ov)
        out = ruamel.yaml.YAML(typ="rt").load(resolved.getvalue())["output_folder"]
    except (ValueError, KeyError) as err:
        raise UserError(f"{hparams_file}: cannot resolve output_folder ({err}); pass --model_dir") from None
    return Path(str(out))


def build_phone_lm(model_dir: Path, vocab, train_csv: Path | None, order: int):
    """The phone n-gram LM, fitted on ``train_csv`` or on the training transcripts kept in the run folder."""
    from common.phone_lm import PhoneNgramLM

    if train_csv is not None:
        return PhoneNgramLM.from_manifest(train_csv, vocab, order)
    return PhoneNgramLM.from_run(model_dir, vocab, order)


def load_rows(csv_path: Path, vocab) -> list[dict]:
    """Manifest rows with checked ``phn`` tokens, duration and wav path (errors name the row)."""
    rows = read_manifest(csv_path)
    data_root = str(csv_path.resolve().parent)
    out, seen = [], set()
    for n, r in enumerate(rows, 2):  # line 1 is the header
        where = f"{csv_path}:{n} (ID {r['ID']})"
        if r["ID"] in seen:
            raise UserError(f"{where}: duplicate ID")
        seen.add(r["ID"])
        toks = (r.get("phn") or "").split()
        if not toks:
            raise UserError(f"{where}: empty phn; PER needs a reference (re-run make_manifests.py)")
        vocab.encode(toks, where=where)
        try:
            dur = float(r["duration"])
        except ValueError:
            raise UserError(f"{where}: duration {r['duration']!r} is not a number") from None
        wav = Path((r["wav"] or "").replace("$data_root", data_root))
        if not wav.is_file():
            raise UserError(f"{where}: audio file {wav} not found")
        out.append({"id": r["ID"], "wav": wav, "duration": dur, "ref": toks, "where": where})
    return out


def decode_rows(decoder: PhonemeDecoder, rows: list[dict], hparams, batch_size: int, device: str) -> list[list[str]]:
    from tqdm import tqdm

    hyps: list[list[str] | None] = [None] * len(rows)
    batches = length_sorted_batches([r["duration"] for r in rows], batch_size)
    with tqdm(total=len(rows), unit="utt", disable=None, desc=decoder.opts.decoder) as bar:
        for idx in batches:
            wavs = []
            for i in idx:
                try:
                    wavs.append(M.load_wav(rows[i]["wav"], hparams))
                except UserError as err:
                    raise UserError(f"{rows[i]['where']}: {err}") from None
            w, lens = M.batch_wavs(wavs, device=device)
            for i, h in zip(idx, decoder(w, lens)):
                hyps[i] = h
            bar.update(len(idx))
    return hyps


def score(rows: list[dict], hyps: list[list[str]]):
    from speechbrain.utils.metric_stats import ErrorRateStats

    stats = ErrorRateStats()
    stats.append([r["id"] for r in rows], hyps, [r["ref"] for r in rows])
    return stats


def rates(rows: list[dict], hyps: list[list[str]], unit_type: str) -> dict:
    """The error rates of the run's unit type (``common/units.py``), each ``(key, name, ErrorRateStats)``: over the
    model's units (PER / CER / piece error rate) and, for characters and pieces, CER and WER of the text they spell
    (``char``: the units are the characters, so CER is the first)."""
    from common.units import RATE_NAMES, chars_of, detokenize

    out = [("per" if unit_type == "phoneme" else "cer" if unit_type == "char" else "piece_er",
            RATE_NAMES[unit_type], score(rows, hyps))]
    if unit_type == "phoneme":
        return out
    texts = [detokenize(r["ref"], unit_type) for r in rows], [detokenize(h, unit_type) for h in hyps]
    if unit_type == "spm":
        out.append(("cer", "CER", score([{**r, "ref": chars_of(t)} for r, t in zip(rows, texts[0])],
                                        [chars_of(t) for t in texts[1]])))
    out.append(("wer", "WER", score([{**r, "ref": t.split()} for r, t in zip(rows, texts[0])],
                                    [t.split() for t in texts[1]])))
    return out


@cli
def main(argv=None) -> int:
    a, extra = parse_args(sys.argv[1:] if argv is None else argv)
    if a.test_csv is None and a.audio is None:
        raise UserError("nothing to decode: give --test_csv MANIFEST or --audio FILE")
    if a.batch_size < 1:
        raise UserError(f"--batch_size must be >= 1, got {a.batch_size}")
    if a.num_threads > 0:
        torch.set_num_threads(a.num_threads)
    if a.test_csv is not None:
        read_manifest(a.test_csv)  # missing / empty manifest: fail before loading the model
    if a.audio is not None and not a.audio.is_file():
        raise UserError(f"{a.audio}: audio file not found")
    data_folder = a.test_csv.resolve().parent if a.test_csv is not None else Path.cwd()
    model_dir = a.model_dir or resolve_model_dir(a.hparams, extra, data_folder)
    if not model_dir.is_dir():
        raise UserError(f"model folder {model_dir} not found; train first (recipes/train.py) or pass --model_dir")
    modules, hparams, vocab = M.load_for_inference(model_dir, a.device)
    if hparams.get("model_family") == "styletts2":
        raise UserError(f"{model_dir} is a fine-tuned StyleTTS2 ASR: decode.py decodes our recognizer; its valid/test "
                        f"CTC greedy PER is in {model_dir / 'metrics.json'}, and align/export_durations.py --model_dir "
                        f"aligns with it")
    lm_order = a.lm_order if a.lm_order is not None else int(hparams["lm_order"])
    if lm_order not in (1, 2, 3):
        raise UserError(f"--lm_order must be 1, 2 or 3, got {lm_order}")
    # the run's beam_lm_weight applies to the attention decoder; an explicit --lm_weight is checked by DecodeOptions
    lm_weight = a.lm_weight if a.lm_weight is not None else (
        float(hparams["beam_lm_weight"]) if a.decoder == "attention" else 0.0)
    lm = build_phone_lm(model_dir, vocab, a.lm_train_csv, lm_order) if lm_weight and a.decoder == "attention" \
        else None
    opts = DecodeOptions(
        decoder=a.decoder,
        beam_size=a.beam_size if a.beam_size is not None else int(hparams["beam_size"]),
        ctc_weight=a.ctc_weight if a.ctc_weight is not None else float(hparams["beam_ctc_weight"]),
        temperature=a.temperature, blank_penalty=a.blank_penalty, insertion_bonus=a.insertion_bonus,
        lm_weight=lm_weight, lm=lm,
    )
    decoder = PhonemeDecoder(modules, hparams, vocab, opts)

    if a.audio is not None:
        wav = M.load_wav(a.audio, hparams)
        if wav.numel() == 0:
            raise UserError(f"{a.audio}: audio file has no samples")
        w, lens = M.batch_wavs([wav], device=a.device)
        print(" ".join(decoder(w, lens)[0]))
        return 0

    rows = load_rows(a.test_csv, vocab)
    t0 = time.time()
    hyps = decode_rows(decoder, rows, hparams, a.batch_size, a.device)
    elapsed = time.time() - t0
    unit_type = run_units(model_dir)["units"]
    scored = rates(rows, hyps, unit_type)
    per_utt = {key: {s["key"]: s["WER"] for s in stats.scores} for key, _, stats in scored}
    out_path = a.output or model_dir / OUTPUT_NAME
    with atomic_write(out_path) as fh:
        for r, h in zip(rows, hyps):
            rec = {"id": r["id"], "ref": " ".join(r["ref"]), "hyp": " ".join(h),
                   **{key: round(v[r["id"]], 4) for key, v in per_utt.items()}}
            fh.write(json.dumps(rec, ensure_ascii=False) + "\n")
    audio_s = sum(r["duration"] for r in rows)
    print(f"{opts.describe()}")
    (_, name, stats), rest = scored[0], scored[1:]
    s = stats.summarize()
    print(f"{len(rows)} utts, {s['num_scored_tokens']} reference tokens: {name} {s['error_rate']:.2f}% "
          f"(sub {s['substitutions']}, del {s['deletions']}, ins {s['insertions']}); "
          f"{elapsed:.1f} s for {audio_s:.1f} s of audio")
    if rest:
        print("of the text they spell: " + ", ".join(f"{n} {st.summarize()['error_rate']:.2f}%" for _, n, st in rest))
    print(f"wrote {out_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
