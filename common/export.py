"""Export Matcha-TTS durations for every row of a corpus (the engine behind ``align/export_durations.py``).

Per row of ``corpus/metadata.csv``: our own features from the audio (``mels/`` is only read for its length), the
token sequence from the G2P/symbols the model was trained with, model scores, MAS (the first pass); then, unless
``refine`` is off, boundary refinement over the whole corpus (``common/refine.py``: a frame classifier re-trained
on the corpus' own alignments, then re-aligned at 5 ms; then ``common/hmm.py``: two HMM-GMMs trained by Viterbi
training, one started from that alignment and one from a flat start; each boundary is the weighted mean of the
three, ``hmm_weight`` for the two HMMs together); optionally boundary calibration (``common/calibration.py``:
offsets from ``calibration``, or fitted on the ``labelled`` rows, which also train the refiner); Matcha frames.
Everything that can be checked is checked before anything is written; every file is written atomically; existing
outputs are skipped unless ``overwrite`` (so a killed run resumes).
"""
from __future__ import annotations

import dataclasses
import json
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from common import align as A
from common import calibration
from common.calibration import Calibration
from common.audio import AudioDataset, audio_info, length_buckets
from common.corpus import read_matcha, read_phones_tsv
from common.durations import (append_alignment, alignment_record, boundaries_to_matcha, matcha_layout,
                              matcha_num_frames, npy_duration_paths, pt_duration_path, write_durations)
from common.g2p import G2P, check_symbols, ipa_to_tokens, load_symbols
from common.io import UserError, safe_join, write_json
from common.vocab import BLANK_ID

MAX_LISTED = 5


@dataclass
class Options:
    corpus: Path
    model_dir: Path
    device: str = "cuda"
    scores: str = "joint"
    ctc_weight: float = 0.5
    fmt: str = "pt"
    add_blank: bool = True
    edge_silence: bool = True
    textgrid: bool = False
    plots: int = 0
    overwrite: bool = False
    no_mels: bool = False
    hop_length: int = 256
    sample_rate: int | None = None  # Matcha's rate; default: each file's own rate
    batch_seconds: float = 200.0
    g2p: str | None = None
    symbols: str | None = None
    phones_tsv: Path | None = None
    metadata: Path | None = None
    wav_dir: Path | None = None
    language: str = "en-us"
    progress: bool = True
    limit: int = 0
    low_conf: float = 0.3
    max_phone_s: float = 1.0
    high_per: float = 60.0
    anchor: bool = True  # pin tokens to their CTC forced-alignment emissions before MAS (common/align.py)
    refine: bool = True  # boundary refinement (common/refine.py) after the first pass
    refine_rounds: int = 8
    refine_minutes: float = 0.0  # >0: wall-clock cap on the refiner's training
    hmm_weight: float = 2 / 3  # refined boundary: (1 - w) x the frame classifier's + w/2 x each HMM-GMM's (0: none)
    precision: str = "auto"  # recognizer's compute: auto (bf16 where the hardware has it), fp32 or bf16
    calibration: Path | None = None  # boundary offsets from align/calibrate.py (common/calibration.py)
    labelled: Path | None = None  # hand-checked rows (phones.tsv or TextGrid folder): refiner labels + calibration


@dataclass
class Item:
    rel: str
    wav: Path
    tokens: list[str]
    ids: list[int]
    num_samples: int
    sr: int
    mel_frames: int
    out: Path
    where: str
    spk: str = ""
    extra: dict = field(default_factory=dict)


PRECISIONS = ("auto", "fp32", "bf16")


def cpu_has_bf16() -> bool:
    """The CPU computes bf16 natively (AVX512-BF16 / AMX through oneDNN); without it bf16 is emulated and slow."""
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_precision(precision: str, device: str) -> str:
    """``auto`` -> bf16 on CUDA and on CPUs with native bf16, else fp32."""
    if precision not in PRECISIONS:
        raise UserError(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision != "auto":
        return precision
    return "bf16" if device.startswith("cuda") or cpu_has_bf16() else "fp32"


def resolve_device(device: str) -> str:
    if device.startswith("cuda") and not torch.cuda.is_available():
        print("CUDA is not available: running on CPU")
        return "cpu"
    return device


def trained_data_folder(model_dir: Path) -> str | None:
    """The manifest folder the model was trained on (``data_folder`` in the run's saved hyperparams.yaml)."""
    import re

    hp = Path(model_dir) / "hyperparams.yaml"
    m = re.search(r"^data_folder:\s*(.+?)\s*$", hp.read_text(encoding="utf-8"), re.M) if hp.is_file() else None
    return m.group(1).strip("'\"") if m else None


def phoneme_source(data_folder, opts: Options) -> dict:
    """G2P / symbols / phones_tsv the model was trained with (its manifests' prep_report.json), unless given."""
    src = {"g2p": opts.g2p, "symbols": opts.symbols, "phones_tsv": opts.phones_tsv}
    report = Path(str(data_folder)) / "prep_report.json" if data_folder else None
    if report is not None and report.is_file() and not any(src.values()):
        o = json.loads(report.read_text(encoding="utf-8")).get("options", {})
        src = {"g2p": o.get("g2p"), "symbols": o.get("symbols"),
               "phones_tsv": Path(o["phones_tsv"]) if o.get("phones_tsv") else None}
    return src


def prepare_items(opts: Options, vocab, data_folder=None) -> list[Item]:
    """Read metadata, phonemize, check audio/mels/vocabulary; raise ``UserError`` before anything is written."""
    corpus = opts.corpus
    recs = read_matcha(corpus, opts.metadata, opts.wav_dir, opts.language)
    if opts.limit:
        recs = recs[: opts.limit]
    if not recs:
        raise UserError(f"{corpus}: metadata has no rows")
    src = phoneme_source(data_folder, opts)
    tokens: dict[str, list[str]] = {}
    if src["phones_tsv"]:
        table = read_phones_tsv(Path(src["phones_tsv"]))
        missing = [r.id for r in recs if r.id not in table]
        if missing:
            raise UserError(f"{src['phones_tsv']}: no phones for {len(missing)} row(s), e.g. {missing[:MAX_LISTED]}; "
                            f"the model was trained on phones from this file (or give --g2p)")
        tokens = {r.id: table[r.id][0] for r in recs}
    else:
        g2p = G2P(src["g2p"], cache_file=opts.model_dir / ".g2p_cache.json")
        for r in recs:
            g2p.check_language(r.language, r.where)
        ph = g2p.phonemize_all(((r.language, r.text) for r in recs), progress=opts.progress)
        tokens = {r.id: ipa_to_tokens(ph[(r.language, r.text)]) for r in recs}
    symbols = load_symbols(src["symbols"])
    missing_audio = [r for r in recs if not r.wav.is_file()]
    if missing_audio:
        raise UserError(f"{len(missing_audio)} audio file(s) missing, e.g. "
                        f"{', '.join(str(r.wav) for r in missing_audio[:MAX_LISTED])}; fix metadata.csv or the wavs")
    mel_paths = {}
    if not opts.no_mels:
        mel_paths = {r.id: safe_join(corpus / "mels", r.id + ".npy", r.where) for r in recs}
        absent = [str(p) for p in mel_paths.values() if not p.is_file()]
        if absent:
            raise UserError(f"{len(absent)} mel file(s) missing, e.g. {', '.join(absent[:MAX_LISTED])}; compute "
                            f"Matcha's mels first, or pass --no_mels to take the length from the audio")
    npy_out = npy_duration_paths((r.id, r.wav) for r in recs) if opts.fmt == "npy" else {}
    items = []
    for r in recs:
        toks = tokens[r.id]
        if not toks:
            raise UserError(f"{r.where}: no phonemes for text {r.text!r}; fix the text or its language")
        if symbols is not None:
            check_symbols(toks, symbols, r.where)
        unknown = sorted({t for t in toks if t not in vocab.index})
        if unknown:
            raise UserError(f"{r.where}: token(s) {unknown} not in the model's tokens.txt ({opts.model_dir}); the "
                            f"model was trained with another G2P/vocabulary: retrain on manifests covering this corpus")
        n, sr = audio_info(r.wav)
        if opts.sample_rate and sr != opts.sample_rate:
            raise UserError(f"{r.wav}: sample rate {sr} Hz but --sample_rate {opts.sample_rate}; Matcha's mels need "
                            f"the corpus rate, resample the audio or fix --sample_rate")
        if r.id in mel_paths:
            try:
                T = int(np.load(mel_paths[r.id], mmap_mode="r").shape[-1])
            except (OSError, ValueError) as err:
                raise UserError(f"{mel_paths[r.id]}: cannot read mel ({err})") from None
        else:
            T = matcha_num_frames(n, opts.hop_length)
        out = npy_out[r.id] if opts.fmt == "npy" else pt_duration_path(corpus, r.id)
        items.append(Item(r.id, r.wav, toks, vocab.encode(toks, r.where), n, sr, T, out, r.where, r.spk_id))
    return items


def check_feasible(items: list[Item], hparams, edge_silence: bool) -> None:
    hop = int(hparams["hop_samples"]) if "hop_samples" in hparams else int(hparams["sample_rate"]) // 100
    model_sr = int(hparams["sample_rate"])
    for it in items:
        frames = 1 + int(it.num_samples * model_sr / it.sr) // hop
        units = len(A.alignment_units(it.tokens, edge_silence)[0])
        if frames < units:
            raise UserError(f"{it.where}: audio too short for its tokens ({it.num_samples / it.sr:.3f}s = {frames} "
                            f"frames for {units} tokens); fix the transcript or remove the row")


def _collate(batch):
    from common.model import batch_wavs

    return [b[0] for b in batch], *batch_wavs([b[1] for b in batch])


def batches_by_length(items: list[Item], seconds: float) -> list[list[int]]:
    return length_buckets([it.num_samples / it.sr for it in items], seconds, longest_first=True)


def greedy_per(ctc_logp: torch.Tensor, ids: list[int]) -> float:
    """PER (%) of the CTC best path [T, V] against the expected tokens (a cheap transcript-mismatch detector)."""
    from common.metrics import error_rate
    from common.model import ctc_greedy

    return error_rate(ids, ctc_greedy(ctc_logp[None], torch.ones(1))[0])


@torch.inference_mode()
def _model_scores(modules, hparams, wavs, lens, tok_bos, tok_lens, kind: str, use_amp: bool):
    """(ctc_logp [B,T,V] float, attention [B,U+1,T] or None, frame lengths); the attention decoder runs only
    when the scores need it. ``use_amp``: bf16 autocast (the features stay fp32)."""
    from common.model import abs_lengths, attention_decode, ctc_log_probs, compute_feats, encode

    with torch.autocast(device_type=wavs.device.type, dtype=torch.bfloat16, enabled=use_amp):
        enc = encode(modules, compute_feats(modules, hparams, wavs, lens), lens)
        ctc_logp, attn = ctc_log_probs(modules, hparams, enc), None
        if kind != "ctc":
            attn = attention_decode(modules, hparams, enc, lens, tok_bos)[1].float()
    return ctc_logp.float(), attn, [int(x) for x in abs_lengths(lens, enc.shape[1]).tolist()]


def _remove_stale_temps(folders) -> None:
    """Temp files of a run that was killed mid-write (``.name.XXXX.tmp``, see common.io.atomic_path)."""
    for d in folders:
        if Path(d).is_dir():
            for tmp in Path(d).glob(".*.tmp"):
                tmp.unlink(missing_ok=True)


def export_corpus(opts: Options) -> dict:
    from tqdm import tqdm

    from common.model import load_for_inference

    t0 = time.time()
    device = resolve_device(opts.device)
    if opts.scores not in A.SCORE_KINDS:
        raise UserError(f"--scores must be one of {', '.join(A.SCORE_KINDS)}")
    precision = resolve_precision(opts.precision, device)
    if opts.calibration and opts.labelled:
        raise UserError("give --labelled (calibrate from those rows in this export) or --calibration (offsets "
                        "fitted before), not both")
    cal = Calibration.load(opts.calibration) if opts.calibration else None
    reference = calibration.load_reference(opts.labelled) if opts.labelled else None
    modules, hparams, vocab = load_for_inference(opts.model_dir, device)
    items = prepare_items(opts, vocab, trained_data_folder(opts.model_dir))
    check_feasible(items, hparams, opts.edge_silence)
    report_dir = opts.corpus / "durations"
    align_file = report_dir / "alignments.jsonl"
    _remove_stale_temps({it.out.parent for it in items} | {report_dir})
    todo = [it for it in items if opts.overwrite or not it.out.is_file()]
    skipped = len(items) - len(todo)
    if opts.overwrite and align_file.is_file():
        align_file.unlink()
    model_sr = int(hparams["sample_rate"])
    hop_s = float(hparams["hop_length"]) / 1000.0
    results: dict[str, dict] = {}
    failures: dict[str, str] = {}
    refining = opts.refine and bool(todo)
    collect = refining or (reference is not None and bool(todo))  # every row's first pass before writing any
    first = items if collect else todo  # the refiner learns from every row, even those already written
    labelled = {}
    if reference is not None and collect:
        labelled = {i: reference[it.rel] for i, it in enumerate(first) if it.rel in reference}
        if not labelled:
            raise UserError(f"{opts.labelled}: none of its {len(reference)} row(s) is in {opts.corpus}'s metadata; "
                            f"name them by rel_path (e.g. {first[0].rel if first else 'voice/utt'})")
    loader = torch.utils.data.DataLoader(AudioDataset([it.wav for it in first], model_sr),
                                         batch_sampler=batches_by_length(first, opts.batch_seconds),
                                         collate_fn=_collate, num_workers=1 if len(first) > 1 else 0)
    plots = {"left": opts.plots, "dir": report_dir / "plots"}
    use_amp = precision == "bf16"
    audio_s = 0.0
    passed: list[dict | None] = [None] * len(first)
    bar = tqdm(total=len(first), desc="export" if not collect else "first pass", unit="utt",
               disable=not opts.progress)
    # without refinement, one background thread writes each finished batch (in order) while the next one runs
    writer, written = ThreadPoolExecutor(max_workers=1, thread_name_prefix="export-writer"), []

    def write(done: list[dict]) -> None:
        _calibrate(done, cal)
        written.append(writer.submit(_write_all, done, opts, align_file, results, failures))

    try:
        _first_pass(loader, first, modules, hparams, device, opts, use_amp, hop_s, passed, plots, bar,
                    None if collect else write)
    finally:
        writer.shutdown(wait=True)
    audio_s += sum(f.result() for f in written)
    bar.close()
    refine_stats = None
    if refining:
        refine_stats = _refine(passed, vocab, device, opts, labelled)
    cal_info = None if cal is None else {"file": str(opts.calibration), "boundaries": cal.boundaries}
    if labelled:
        cal = _fit_labelled(passed, labelled, report_dir / "calibration.json", opts)
        cal_info = {"labelled": str(opts.labelled), "labelled_rows": len(labelled), "boundaries": cal.boundaries,
                    "file": str(report_dir / "calibration.json")}
    if collect:
        _calibrate(passed, cal)
        todo_rels = {it.rel for it in todo}
        audio_s += _write_all([d for d in passed if d["it"].rel in todo_rels], opts, align_file, results, failures)
    flagged = {rel: r["flags"] for rel, r in results.items() if r["flags"]}
    elapsed = time.time() - t0
    report = {
        "corpus": str(opts.corpus), "model_dir": str(opts.model_dir), "device": device, "precision": precision,
        "scores": opts.scores, "format": opts.fmt, "add_blank": opts.add_blank, "hop_length": opts.hop_length,
        "mel_lengths_from": "audio" if opts.no_mels else "mels/",
        "counts": {"success": len(results), "failure": len(failures), "skipped_existing": skipped,
                   "total": len(items)},
        "failures": failures, "flagged": flagged,
        "flag_rules": {"low_confidence": f"mean phone confidence < {opts.low_conf}",
                       "long_phone": f"a phone longer than {opts.max_phone_s}s",
                       "high_per": f"CTC greedy PER vs the transcript > {opts.high_per}%"},
        "utterances": {rel: {k: r[k] for k in ("confidence", "greedy_per", "frames", "flags")}
                       for rel, r in results.items()},
        "refine": refine_stats,
        "calibration": cal_info,
        "seconds": round(elapsed, 2), "audio_seconds": round(audio_s, 2),
        "realtime_factor": round(audio_s / elapsed, 1) if elapsed > 0 else None,
    }
    write_json(report_dir / "export_report.json", report)
    return report


def _first_pass(loader, first: list[Item], modules, hparams, device: str, opts: Options, use_amp: bool,
                hop_s: float, passed: list, plots: dict, bar, write) -> None:
    """The recognizer + MAS over every batch: fills ``passed[i]`` (item, units, frame counts, confidence, greedy
    PER); ``write(done)``, when given, is handed each finished batch."""
    from common.model import batch_tokens_bos

    for idx, wavs, lens in loader:
        batch = [first[i] for i in idx]
        tok_bos, tok_lens = batch_tokens_bos([it.ids for it in batch])
        ctc_logp, attn, frame_lens = _model_scores(modules, hparams, wavs.to(device), lens.to(device),
                                                   tok_bos.to(device), tok_lens.to(device), opts.scores, use_amp)
        units, scores = [], []
        for k, it in enumerate(batch):
            u, lead, trail = A.alignment_units(it.tokens, opts.edge_silence)
            units.append((u, lead, trail))
            ctc_k = ctc_logp[k, : frame_lens[k]]
            att_k = None if attn is None else attn[k, :, : frame_lens[k]]
            sc = A.score_matrix(ctc_k, att_k, it.ids, lead, trail, opts.scores, opts.ctc_weight)
            spans = A.ctc_emissions(ctc_k, it.ids) if opts.anchor else None
            scores.append(A.anchor(sc, spans, lead) if spans else sc)
        frames = A.mas_frames(scores, frame_lens)
        done = []
        for k, (i, it) in enumerate(zip(idx, batch)):
            ctc_k = ctc_logp[k, : frame_lens[k]].cpu()
            d = dict(it=it, units=units[k], frames=frames[k], hop_s=hop_s,
                     conf=A.token_confidence(ctc_k, it.ids, frames[k], units[k][1]), per=greedy_per(ctc_k, it.ids))
            if plots["left"] > 0:
                _plot(it, units[k][0], frames[k], scores[k].cpu(), hop_s, plots["dir"])
                plots["left"] -= 1
            passed[i] = d
            done.append(d)
        if write is not None:
            write(done)
        bar.update(len(batch))


def _refine(passed: list[dict], vocab, device: str, opts: Options, labelled: dict) -> dict:
    """Replace every first-pass alignment by the refined one (unit frames on a 1 ms grid when the HMM-GMM pass
    runs, else at the refiner's 5 ms hop); returns stats. ``labelled[i]``: reference segments of row ``i``, whose
    boundaries become the refiner's training labels for that row."""
    from common.audio import load_audio
    from common.hmm import FLAT_START_SCHEDULE, MFCC, HMMConfig, hmm_realign
    from common.refine import RefineConfig, refine, unit_label_ids

    cfg = RefineConfig(rounds=opts.refine_rounds, max_minutes=opts.refine_minutes)
    hcfg = HMMConfig(sample_rate=cfg.sample_rate)
    mfcc = MFCC(hcfg.sample_rate, hcfg.hop_ms, hcfg.delta_ms) if opts.hmm_weight > 0 else None
    mfccs: list = [None] * len(passed)

    def load(i: int) -> torch.Tensor:  # the audio is read once for both passes
        w = load_audio(passed[i]["it"].wav, cfg.sample_rate)[0]
        if mfcc is not None:
            mfccs[i] = mfcc(w)
        return w

    unit_ids = [unit_label_ids(d["it"].ids, d["units"][1], d["units"][2], BLANK_ID) for d in passed]
    durations = [d["it"].num_samples / d["it"].sr for d in passed]
    first_ends = [_unit_ends(d) for d in passed]
    log = (lambda m: print(m, flush=True)) if opts.progress else None
    fixed = {i: calibration.pin_to_reference(passed[i]["units"][0], first_ends[i], ref, cfg.hop_ms / 1000.0)
             for i, ref in labelled.items()}
    counts, confs, stats = refine(load, len(passed), unit_ids, first_ends, len(vocab), cfg, device, log, fixed)
    if mfcc is None:
        for d, c, rc in zip(passed, counts, confs):
            d.update(frames=c, hop_s=cfg.hop_ms / 1000.0, refine_conf=rc)
        return stats
    ends = [A.frame_ends_seconds(c, cfg.hop_ms / 1000.0, t) for c, t in zip(counts, durations)]
    # two HMM-GMMs: one started from the classifier's alignment, one from a flat start (it shares none of the
    # classifier's errors); the refined boundary is the weighted mean of the three
    stats["hmm"] = {}
    members = [(1.0 - opts.hmm_weight, ends)]
    for name, init, sched in (("from_refined", ends, hcfg.schedule), ("flat_start", None, FLAT_START_SCHEDULE)):
        h, stats["hmm"][name] = hmm_realign(mfccs, durations, unit_ids, init, len(vocab),
                                            dataclasses.replace(hcfg, schedule=sched), log)
        members.append((opts.hmm_weight / 2.0, h))
    grid = 0.001
    for i, (d, rc, t) in enumerate(zip(passed, confs, durations)):
        have = [(w, m[i]) for w, m in members if m[i] is not None]  # an HMM skips rows too fast for 3 states/unit
        total = sum(w for w, _ in have)
        e = sum(w * m for w, m in have) / total if total > 0 else ends[i]
        d.update(frames=A.ends_to_counts(e, int(round(t / grid)), grid), hop_s=grid, refine_conf=rc)
    return stats


def _fit_labelled(passed: list[dict], labelled: dict, out: Path, opts: Options) -> Calibration:
    """Calibration offsets from the labelled rows of this export (``common/calibration.py``), saved to ``out``."""
    samples = []
    for i, ref in labelled.items():
        d = passed[i]
        samples += calibration.boundary_samples(d["it"].spk, d["units"][0], _unit_ends(d), ref)
    cal = calibration.fit(samples, info={"utterances": len(labelled), "boundaries": len(samples),
                                         "reference": str(opts.labelled), "refined": opts.refine})
    cal.save(out)
    return cal


def _calibrate(done: list[dict], cal: Calibration | None) -> None:
    """Move each utterance's boundaries by the calibrated offsets of their types (``common/calibration.py``)."""
    if cal is None:
        return
    for d in done:
        ends = calibration.apply(d["units"][0], _unit_ends(d), d["it"].spk, cal, d["hop_s"])
        d["frames"] = A.ends_to_counts(ends, int(np.sum(d["frames"])), d["hop_s"])


def _unit_ends(d: dict) -> np.ndarray:
    """End time (s) of each aligned unit of a finished utterance (its frame counts at its hop)."""
    return A.frame_ends_seconds(d["frames"], d["hop_s"], d["it"].num_samples / d["it"].sr)


def _write_all(done: list[dict], opts: Options, align_file: Path, results: dict, failures: dict) -> float:
    """Write every finished utterance; returns the seconds of audio written."""
    audio_s = 0.0
    for d in done:
        it = d["it"]
        try:
            results[it.rel] = _write_one(d, opts, align_file)
            audio_s += it.num_samples / it.sr
        except (UserError, ValueError, OSError) as err:
            failures[it.rel] = str(err)
    return audio_s


def _write_one(d: dict, opts: Options, align_file: Path) -> dict:
    """One utterance's files. ``d``: the item, its aligned units, per-unit frame counts at ``hop_s``, the CTC
    confidence of each token and the greedy PER (first pass), and the refiner's per-unit confidence if refined."""
    it, (tokens, lead, trail), frames, hop_s, conf, per = (d["it"], d["units"], d["frames"], d["hop_s"], d["conf"],
                                                            d["per"])
    duration = it.num_samples / it.sr
    seq, counts = matcha_layout(tokens, frames.tolist(), add_blank=opts.add_blank)
    ends = A.frame_ends_seconds(np.asarray(counts), hop_s, duration)
    durs = boundaries_to_matcha(ends, it.mel_frames, it.sr, opts.hop_length)
    unit_ends = _unit_ends(d)
    phone_s = np.diff(np.concatenate([[0.0], unit_ends]))
    flags = []
    if conf.mean() < opts.low_conf:
        flags.append("low_confidence")
    phone_mask = [t not in A.SILENCE_TOKENS and t != A.SIL for t in tokens]
    if np.any(phone_s[phone_mask] > opts.max_phone_s):
        flags.append("long_phone")
    if per > opts.high_per:
        flags.append("high_per")
    extra = {}
    if "refine_conf" in d:
        rc = d["refine_conf"][1 if lead else 0:][: len(it.ids)]
        extra["refine_confidence"] = [round(float(c), 4) for c in rc]
    rec = alignment_record(it.rel, seq, durs, add_blank=opts.add_blank, sample_rate=it.sr,
                           hop_length=opts.hop_length, aligned_tokens=tokens,
                           aligned_ends_s=[round(float(e), 5) for e in unit_ends],
                           confidence=[round(float(c), 4) for c in conf], speaker=it.spk, **extra)
    append_alignment(align_file, rec)
    if opts.textgrid:
        from common.boundaries import spans_from_ends
        from common.textgrid import words_from_spans, write_textgrid

        spans = spans_from_ends(tokens, unit_ends)
        tg = safe_join(opts.corpus / "textgrids", it.rel + ".TextGrid", it.where)
        write_textgrid(tg, [s for s in spans if s.label not in (A.SIL,)], words_from_spans(spans), duration)
    write_durations(it.out, durs, opts.fmt)
    return {"confidence": round(float(conf.mean()), 4), "greedy_per": round(per, 2), "frames": int(durs.sum()),
            "flags": flags}


def _plot(it: Item, tokens, frames, scores: torch.Tensor, hop_s: float, out_dir: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from common.audio import load_audio as _load
    from common.io import atomic_path

    wav, sr = _load(it.wav)
    S = scores.cpu().numpy()
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(12, 6), sharex=False)
    ax1.specgram(wav.numpy(), NFFT=512, Fs=sr, noverlap=384, cmap="magma")
    ends = np.cumsum(frames)
    for e, t in zip(ends, tokens):
        ax1.axvline((e - 0.5) * hop_s, color="c", lw=0.6)
    starts = np.concatenate([[0], ends[:-1]])
    for s, e, t in zip(starts, ends, tokens):
        ax1.text(((s + e) / 2 - 0.5) * hop_s, sr * 0.45, t, color="w", ha="center", fontsize=7)
    ax1.set_ylabel("Hz")
    ax1.set_title(f"{it.rel}: audio with phone boundaries")
    ax2.imshow(np.maximum(S, -20), aspect="auto", origin="lower", interpolation="nearest")
    path_t = np.arange(int(ends[-1]))
    path_u = np.searchsorted(ends, path_t, side="right")
    ax2.plot(path_t, path_u, "r-", lw=0.8)
    ax2.set_xlabel("encoder frame (10 ms)")
    ax2.set_ylabel("token")
    ax2.set_title("alignment scores with the MAS path")
    fig.tight_layout()
    target = safe_join(out_dir, it.rel.replace("/", "__") + ".png", it.where)
    with atomic_path(target) as tmp:
        fig.savefig(tmp, format="png", dpi=90)
    plt.close(fig)
