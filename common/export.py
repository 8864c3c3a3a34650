"""Export Matcha-TTS durations for every row of a corpus (the engine behind ``align/export_durations.py``).

Configuration: ``hparams/export.yaml`` (every knob once, with its default; ``load_options`` reads it with overrides
into an ``ExportOptions``). Per row of ``corpus/metadata.csv`` (an ``Item``): our own features from the audio
(``mels/`` is only read for its length), the token sequence from the G2P/symbols the model was trained with (its run
folder's ``phonemes.json``), model scores and MAS (``FirstPass``: one ``Alignment`` per row); then, unless
``refine`` is off, boundary refinement over the whole corpus (``common.refine.refine_boundaries``: trained on the
corpus and stored in ``durations/refiner.ckpt``, or aligning with the one stored there, ``Refinement``); optionally
boundary calibration (``common/calibration.py``: offsets from ``calibration``, or fitted on the ``labelled`` rows,
which also train the refiner); Matcha frames (``common.durations.export_durations``).

Everything that can be checked is checked before anything is written; every file is written atomically; existing
outputs are skipped unless ``overwrite`` (so a killed run resumes). ``durations/export_report.json`` records what made
the export (checkpoint, project version and commit, package versions, every option) and nothing that changes from
run to run, so two exports of one corpus with the same settings are byte-identical; wall-clock figures go to
``durations/export_timing.json``.
"""
from __future__ import annotations

import dataclasses
import io
import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from common import calibration
from common import first_pass as A
from common import long_rows
from common import units as U
from common import frames as F
from common.audio import AudioDataset, audio_info, length_buckets
from common.calibration import Calibration
from common.review import RULES as FLAG_RULES, review_flags
from common.hmm import ENSEMBLE_WEIGHTS, FLAT_INITS, MIXTURE_SCORES, POSTERIOR_POINTS, VARIANT_KEYS
from common.refine import FUSIONS, HMM_INITS
from common.corpus import read_matcha, read_phones_tsv
from common.ddp import Shard
from common.mas import set_threads
from common.durations import (FORMATS, alignment_record, append_alignment, export_durations, matcha_num_frames,
                              npy_duration_paths, pt_duration_path, write_durations)
from common.g2p import G2P, check_symbols, load_symbols
from common.io import UserError, safe_join, write_json
from common.vocab import BLANK_ID, SIL, SILENCE_TOKENS

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_YAML = ROOT / "hparams" / "export.yaml"
REPORT_FILE, TIMING_FILE, ALIGNMENTS_FILE = "export_report.json", "export_timing.json", "alignments.jsonl"
MAX_LISTED = 5
PRECISIONS = ("auto", "fp32", "bf16")
CHECKPOINTS = {"per": "PER", "joint": "joint"}  # --checkpoint -> the checkpoint meta key it minimizes (train.py saves)


# --------------------------------------------------------------------------------------------------------------------
# Options (hparams/export.yaml)
# --------------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ExportOptions:
    """The export's settings: the top-level keys of ``hparams/export.yaml`` (which holds their defaults and help)
    plus the objects it builds from them, ``refiner``, ``hmm_aligner``, ``boundary_detector`` and ``long_rows``."""
    corpus: Path
    model_dir: Path
    checkpoint: str
    metadata: Path | None
    wav_dir: Path | None
    language: str
    limit: int
    g2p: str | None
    symbols: str | None
    phones_tsv: Path | None
    styletts2_asr: Path | None
    styletts2_config: Path | None
    styletts2_blank: int
    first_pass: str
    format: str
    add_blank: bool
    hop_length: int
    sample_rate: int | None
    no_mels: bool
    textgrid: bool
    plots: int
    overwrite: bool
    progress: bool
    device: str
    precision: str
    scores: str
    ctc_weight: float
    anchor: bool
    edge_silence: bool
    batch_seconds: float
    low_conf: float
    max_phone_s: float
    high_per: float
    flag_rule: str
    flag_z: float
    flag_min_rows: int
    refine: bool
    refiner_model: str
    light_first_pass: bool
    refine_rounds: int
    refine_minutes: float
    refine_max_train_hours: float
    refine_hop_ms: float
    refine_win_ms: float
    refine_epochs: int
    refine_epochs_later: int
    refine_channels: int
    refine_kernel: int
    refine_dilations: list
    refine_lr: float
    refine_batch_seconds: float
    refine_prior_weight: float
    refine_margin_ms: float
    refine_margin_frac: float
    refine_margin_decay: float
    refine_seed: int
    feature_sample_rate: int
    refine_phone_features: bool
    hmm_weight: float
    hmm_states: int
    hmm_hop_ms: float
    hmm_delta_ms: float
    hmm_win_ms: float
    hmm_schedule: list
    hmm_flat_start_schedule: list
    hmm_em_iters: int
    hmm_max_train_hours: float
    hmm_seed: int
    hmm_flat_start_max_s: float
    hmm_init: str
    hmm_flat_init: str
    hmm_vad_min_share: float
    hmm_split_trailing_silence: bool
    hmm_tie_min_count: int
    hmm_variants: list
    hmm_rounds: int
    hmm_flat_single: bool
    hmm_concurrent: bool
    hmm_mixture_score: str
    hmm_posterior_scale: float
    hmm_posterior_point: str
    hmm_ensemble_weights: str
    hmm_sd_floor_ms: float
    fusion: str
    fusion_gate_ms: float
    fusion_first_pass: float
    fusion_precision: bool
    final_cap: float
    closure_snap: float
    closure_window_ms: list
    closure_offset_ms: float
    detector_weight: float
    detector_epochs: int
    detector_channels: int
    detector_lr: float
    detector_window_ms: float
    detector_search_ms: float
    detector_batch_seconds: float
    detector_seed: int
    dump_members: bool
    long_row_s: float
    piece_s: float
    ctc_window_s: float
    ctc_context_s: float
    calibration: Path | None
    labelled: Path | None
    refiner: object  # common.refine.RefineConfig
    hmm_aligner: object  # common.hmm.HMMConfig
    boundary_detector: object  # common.boundary_detector.DetectorConfig
    long_rows: object  # common.long_rows.LongRowConfig

    def __post_init__(self):
        for k in ("corpus", "model_dir", "metadata", "wav_dir", "phones_tsv", "styletts2_asr", "styletts2_config",
                  "calibration", "labelled"):
            v = getattr(self, k)
            if v is not None and not isinstance(v, Path):
                object.__setattr__(self, k, Path(str(v)))
        members = self.hmm_variants if isinstance(self.hmm_variants, (list, tuple)) else []
        unknown_keys = sorted({str(k) for v in members if isinstance(v, dict) for k in v} - set(VARIANT_KEYS))
        checks = [
            (self.scores in A.SCORE_KINDS, f"--scores must be one of {', '.join(A.SCORE_KINDS)}, got {self.scores!r}"),
            (self.precision in PRECISIONS,
             f"--precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}"),
            (self.format in FORMATS, f"--format must be one of {', '.join(FORMATS)}, got {self.format!r}"),
            (0.0 <= self.ctc_weight <= 1.0, f"--ctc_weight must be in [0, 1], got {self.ctc_weight}"),
            (0.0 <= self.hmm_weight <= 1.0, f"--hmm_weight must be in [0, 1], got {self.hmm_weight}"),
            (self.refine_rounds >= 0, f"--refine_rounds must be >= 0, got {self.refine_rounds}"),
            (bool(str(self.refiner_model)), "--refiner_model must be auto, fit or a refiner.ckpt file"),
            (self.refine_rounds > 0 or self.hmm_weight > 0,
             "--refine_rounds 0 (no frame classifier) needs the HMM-GMMs: --hmm_weight > 0"),
            (self.hmm_rounds >= 1, f"--hmm_rounds must be >= 1, got {self.hmm_rounds}"),
            (isinstance(self.hmm_variants, (list, tuple)) and all(isinstance(v, dict) for v in self.hmm_variants),
             f"--hmm_variants must be a list of {{key: value}} maps, got {self.hmm_variants!r}"),
            (not unknown_keys, f"--hmm_variants: unknown key(s) {', '.join(unknown_keys)}; a member may change "
                               f"{', '.join(VARIANT_KEYS)}"),
            (self.batch_seconds > 0, f"--batch_seconds must be > 0, got {self.batch_seconds}"),
            (self.hop_length > 0, f"--hop_length must be > 0, got {self.hop_length}"),
            (self.limit >= 0 and self.plots >= 0, "--limit and --plots must be >= 0"),
            (self.hmm_states >= 1, f"--hmm_states must be >= 1, got {self.hmm_states}"),
            (self.checkpoint in CHECKPOINTS,
             f"--checkpoint must be one of {', '.join(CHECKPOINTS)}, got {self.checkpoint!r}"),
            (self.flag_rule in FLAG_RULES,
             f"--flag_rule must be one of {', '.join(FLAG_RULES)}, got {self.flag_rule!r}"),
            (self.fusion in FUSIONS, f"--fusion must be one of {', '.join(FUSIONS)}, got {self.fusion!r}"),
            (self.fusion_gate_ms > 0, f"--fusion_gate_ms must be > 0, got {self.fusion_gate_ms}"),
            (self.hmm_init in HMM_INITS, f"--hmm_init must be one of {', '.join(HMM_INITS)}, got {self.hmm_init!r}"),
            (self.hmm_mixture_score in MIXTURE_SCORES,
             f"--hmm_mixture_score must be one of {', '.join(MIXTURE_SCORES)}, got {self.hmm_mixture_score!r}"),
            (self.hmm_posterior_scale >= 0, f"--hmm_posterior_scale must be >= 0, got {self.hmm_posterior_scale}"),
            (self.hmm_ensemble_weights in ENSEMBLE_WEIGHTS,
             f"--hmm_ensemble_weights must be one of {', '.join(ENSEMBLE_WEIGHTS)}, got {self.hmm_ensemble_weights!r}"),
            (self.hmm_sd_floor_ms > 0, f"--hmm_sd_floor_ms must be > 0, got {self.hmm_sd_floor_ms}"),
            (self.hmm_posterior_point in POSTERIOR_POINTS,
             f"--hmm_posterior_point must be one of {', '.join(POSTERIOR_POINTS)}, got {self.hmm_posterior_point!r}"),
            (self.hmm_flat_init in FLAT_INITS,
             f"--hmm_flat_init must be one of {', '.join(FLAT_INITS)}, got {self.hmm_flat_init!r}"),
            (self.fusion_first_pass >= 0 and self.final_cap >= 0, "--fusion_first_pass and --final_cap must be >= 0"),
            (0.0 <= self.closure_snap <= 1.0, f"--closure_snap must be in [0, 1], got {self.closure_snap}"),
            (isinstance(self.closure_window_ms, (list, tuple)) and len(self.closure_window_ms) == 2
             and all(isinstance(x, (int, float)) and x >= 0 for x in self.closure_window_ms)
             and sum(self.closure_window_ms) > 0,
             f"--closure_window_ms must be [before, after] in ms (>= 0, not both 0), got {self.closure_window_ms!r}"),
            (self.long_row_s <= 0 or 0 < self.piece_s <= self.long_row_s,
             f"--piece_s must be in (0, --long_row_s], got {self.piece_s} and {self.long_row_s}"),
            (self.styletts2_asr is not None or self.styletts2_config is None,
             "--styletts2_config goes with --styletts2_asr (the checkpoint it configures)"),
            (self.first_pass == "recognizer" or self.scores == "ctc",
             f"--first_pass {self.first_pass}: a Hugging Face CTC model has no attention; give --scores ctc "
             f"(not {self.scores})"),
            (self.first_pass == "recognizer" or self.styletts2_asr is None,
             "give --first_pass hf:... or --styletts2_asr (the first pass's model), not both"),
            (not (self.calibration and self.labelled),
             "give --labelled (calibrate from those rows in this export) or --calibration (offsets fitted before), "
             "not both"),
        ]
        for ok, msg in checks:
            if not ok:
                raise UserError(msg)
        try:
            self.boundary_detector.check()
        except ValueError as err:
            raise UserError(f"--detector_*: {err}") from None
        from common.hf_first_pass import model_name

        model_name(self.first_pass)  # 'recognizer' or hf:DIR_OR_NAME, else a one-line error

    def as_record(self) -> dict:
        """Every option, as the report records it."""
        out = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            out[f.name] = dataclasses.asdict(v) if dataclasses.is_dataclass(v) else (
                str(v) if isinstance(v, Path) else v)
        return out


def load_options(overrides: dict | None = None, yaml_path: str | Path = DEFAULT_YAML) -> ExportOptions:
    """``hparams/export.yaml`` with ``overrides`` (top-level keys) -> ``ExportOptions`` (checked)."""
    from common import config

    hp = config.load(yaml_path, overrides)
    names = [f.name for f in dataclasses.fields(ExportOptions)]
    extra = sorted(set(k for k in hp if not k.startswith("__")) - set(names))
    missing = [k for k in names if k not in hp]
    if extra or missing:
        raise UserError(f"{yaml_path}: keys {extra} are not export options and {missing} are missing; start from "
                        f"{DEFAULT_YAML}")
    return ExportOptions(**{k: hp[k] for k in names})


# --------------------------------------------------------------------------------------------------------------------
# The refiner's trained models (refiner.ckpt)
# --------------------------------------------------------------------------------------------------------------------
REFINER_FILE, REFINER_VERSION = "refiner.ckpt", 1
REFINER_PREFIXES = ("refine_", "hmm_", "fusion", "closure_", "detector_", "feature_sample_rate")
NOT_REFINER = ("refine_minutes", "hmm_concurrent")  # scheduling only: they do not change what is trained


def refiner_settings(opts: ExportOptions) -> dict:
    """The options that decide what the refiner trains and how its members are combined: a stored refiner aligns
    only an export with the same ones."""
    return {k: v for k, v in sorted(opts.as_record().items())
            if k.startswith(REFINER_PREFIXES) and k not in NOT_REFINER}


def refiner_path(opts: ExportOptions) -> Path:
    """Where ``--refiner_model`` points: the corpus' own CORPUS/durations/refiner.ckpt (auto, fit), or the file
    named."""
    if opts.refiner_model not in ("auto", "fit"):
        return Path(opts.refiner_model)
    return opts.corpus / "durations" / REFINER_FILE


def _refiner_record(model: LoadedModel) -> str:
    """The checkpoint a refiner was fitted after (its folder's name: a new checkpoint of the run is another)."""
    return Path(str(model.checkpoint)).name


def load_refiner(opts: ExportOptions, model: LoadedModel, vocab, labelled: bool) -> tuple[dict | None, str]:
    """The stored refiner this export aligns with (the file's contents), or None: then it is trained here. And
    why, in words. ``auto``: CORPUS/durations/refiner.ckpt when its settings, vocabulary and checkpoint are this
    export's; ``fit``: never; a file named: it must match, or a one-line error says what differs."""
    if opts.refiner_model == "fit":
        return None, "trained here (--refiner_model fit)"
    path, named = refiner_path(opts), opts.refiner_model != "auto"
    if not path.is_file():
        if named:
            raise UserError(f"--refiner_model {path}: file not found (write one with align/export_durations.py "
                            "--fit_refiner, or use --refiner_model auto)")
        return None, "trained here (no stored refiner)"
    if labelled:
        if named:
            raise UserError(f"--labelled rows train the refiner: drop --refiner_model {path} (or the labels)")
        return None, "trained here (--labelled rows train it)"
    try:
        stored = torch.load(path, map_location="cpu", weights_only=True)
        ok_file = isinstance(stored, dict) and stored.get("version") == REFINER_VERSION
    except Exception as err:  # noqa: BLE001 - any unreadable file gets the same one-line answer
        raise UserError(f"{path}: not a refiner file ({type(err).__name__}: {err}); delete it, or write it again "
                        "with align/export_durations.py --fit_refiner") from None
    if not ok_file:
        raise UserError(f"{path}: not a refiner file of this version; write it again with "
                        "align/export_durations.py --fit_refiner")
    want = refiner_settings(opts)
    why = [f"--{k}" for k in sorted(set(want) | set(stored["settings"]))
           if want.get(k) != stored["settings"].get(k)]
    if list(stored["tokens"]) != list(vocab.tokens):
        why.append("the vocabulary")
    if stored["checkpoint"] != _refiner_record(model):
        why.append(f"the checkpoint ({stored['checkpoint']}, now {_refiner_record(model)})")
    if why:
        msg = f"{path} was fitted with other {', '.join(why[:6])}{' ...' if len(why) > 6 else ''}"
        if named:
            raise UserError(msg + "; fit it again (align/export_durations.py --fit_refiner) or use --refiner_model fit")
        return None, f"trained here ({msg})"
    return {**stored, "file": str(path)}, "stored"


def save_refiner(path: Path, models: dict, stats: dict, opts: ExportOptions, model: LoadedModel, vocab,
                 rows: int, audio_s: float) -> None:
    """refiner.ckpt (atomically): the trained models, what they were fitted with and on, and the training's stats
    (an export that aligns with them reports those, so its report is the one of the export that trained them)."""
    from common.io import atomic_path

    def ordered(x):  # the same bytes for the same models (threads fill the dicts in either order)
        if isinstance(x, dict):
            return {k: ordered(x[k]) for k in sorted(x, key=str)}
        return [ordered(v) for v in x] if isinstance(x, list) else x

    buf = io.BytesIO()  # (saved to a file, torch names the archive's records after the file: a temporary name)
    torch.save({"version": REFINER_VERSION, "settings": refiner_settings(opts), "tokens": list(vocab.tokens),
                "checkpoint": _refiner_record(model), "corpus": str(opts.corpus), "rows": rows,
                "audio_seconds": round(audio_s, 2), "stats": stats, "models": ordered(models)}, buf)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        tmp.write_bytes(buf.getvalue())


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


# --------------------------------------------------------------------------------------------------------------------
# Rows
# --------------------------------------------------------------------------------------------------------------------
@dataclass
class Item:
    """One corpus row, checked: its tokens (as the model knows them), audio and Matcha length, output path."""
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
    span: tuple[int, int] | None = None  # a piece of a long row: its samples [start, stop) (common/long_rows.py)

    @property
    def duration_s(self) -> float:
        return self.num_samples / self.sr


@dataclass
class Alignment:
    """One row through the export: its aligned units (the tokens plus the edge silence slots the aligner added,
    ``lead`` / ``trail``), the frames of each unit at ``hop_s`` (centred frames, ``common/frames.py``), the first
    pass's per-token CTC confidence and greedy PER, and the refiner's per-unit confidence once refined."""
    item: Item
    units: list[str]
    lead: bool
    trail: bool
    frames: np.ndarray
    hop_s: float
    confidence: np.ndarray
    greedy_per: float
    refine_confidence: np.ndarray | None = None
    ctc_gap: float = 0.0  # nats per frame the transcript costs against the recognizer's best path (``ctc_gap``)
    hmm_fit: float | None = None  # the HMM-GMMs' fit gap of the refined alignment (common.hmm.fit_gaps)
    members: dict | None = None  # --dump_members: each refinement member's unit end times, by name

    def unit_ends(self) -> np.ndarray:
        """End time (s) of each unit."""
        return F.frame_ends_seconds(self.frames, self.hop_s, self.item.duration_s)

    def unit_ids(self) -> list[int]:
        """Class ids of the units (the refiner's and the HMM-GMMs' classes)."""
        from common.refine import unit_label_ids

        return unit_label_ids(self.item.ids, self.lead, self.trail, BLANK_ID)

    def move_to(self, ends_s: np.ndarray) -> None:
        """New unit end times, kept on this alignment's frame grid (the frame total stays)."""
        self.frames = F.ends_to_counts(ends_s, int(np.sum(self.frames)), self.hop_s)


def phoneme_source(opts: ExportOptions) -> dict:
    """G2P / symbols / phones_tsv: the ones given, else those the model was trained with (its run folder)."""
    if opts.styletts2_asr or opts.first_pass != "recognizer":  # StyleTTS2 (and espeak-IPA HF models) phonemize
        # with espeak-ng (stress and punctuation kept), as our default G2P
        if opts.g2p or opts.symbols or opts.phones_tsv:
            return {"g2p": opts.g2p, "symbols": opts.symbols, "phones_tsv": opts.phones_tsv, "from": "options"}
        return {"g2p": None, "symbols": None, "phones_tsv": None,
                "from": f"{'StyleTTS2' if opts.styletts2_asr else opts.first_pass} (espeak-ng IPA)"}
    units = U.run_units(opts.model_dir)  # the run's unit type (common/units.py): phonemes, characters or pieces
    if opts.g2p or opts.symbols or opts.phones_tsv:
        return {"g2p": opts.g2p, "symbols": opts.symbols, "phones_tsv": opts.phones_tsv, "from": "options", **units}
    from common.run_folder import load_phoneme_source

    src = load_phoneme_source(opts.model_dir)
    return {"g2p": src.get("g2p"), "symbols": src.get("symbols"), "phones_tsv": src.get("phones_tsv"),
            "from": "run folder", **units}


def prepare_items(opts: ExportOptions, vocab, src: dict) -> list[Item]:
    """Read metadata, phonemize, check audio/mels/vocabulary; raise ``UserError`` before anything is written."""
    corpus = opts.corpus
    recs = read_matcha(corpus, opts.metadata, opts.wav_dir, opts.language)
    if opts.limit:
        recs = recs[: opts.limit]
    if not recs:
        raise UserError(f"{corpus}: metadata has no rows")
    if src["phones_tsv"]:
        table = read_phones_tsv(Path(src["phones_tsv"]))
        missing = [r.id for r in recs if r.id not in table]
        if missing:
            raise UserError(f"{src['phones_tsv']}: no phones for {len(missing)} row(s), e.g. {missing[:MAX_LISTED]}; "
                            f"the model was trained on phones from this file (or give --g2p)")
        tokens = {r.id: table[r.id][0] for r in recs}
    else:
        g2p = G2P(src["g2p"], cache_file=None if opts.styletts2_asr or opts.first_pass != "recognizer" else
                  opts.model_dir / ".g2p_cache.json")
        for r in recs:
            g2p.check_language(r.language, r.where)
        ph = g2p.phonemize_all(((r.language, r.text) for r in recs), progress=opts.progress)
        to_tokens = U.text_tokenizer(src)  # one token per character, or SentencePiece pieces
        tokens = {r.id: to_tokens(ph[(r.language, r.text)], r.where) for r in recs}
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
    npy_out = npy_duration_paths((r.id, r.wav) for r in recs) if opts.format == "npy" else {}
    items = []
    for r in recs:
        toks = tokens[r.id]
        if not toks:
            raise UserError(f"{r.where}: no phonemes for text {r.text!r}; fix the text or its language")
        if symbols is not None:
            check_symbols(U.symbols_of(toks, src), symbols, r.where)
        unknown = sorted({t for t in toks if t not in vocab.index})
        if unknown and hasattr(vocab, "unknown_message"):  # a StyleTTS2 symbol table
            raise UserError(f"{r.where}: {vocab.unknown_message(unknown)}")
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
        out = npy_out[r.id] if opts.format == "npy" else pt_duration_path(corpus, r.id)
        items.append(Item(r.id, r.wav, toks, vocab.encode(toks, r.where), n, sr, T, out, r.where, r.spk_id))
    return items


def check_feasible(items: list[Item], scorer, edge_silence: bool) -> None:
    edge_silence = edge_silence or scorer.edge_rows
    for it in items:
        frames = scorer.num_frames(int(it.num_samples * scorer.sample_rate / it.sr))
        units = len(A.alignment_units(it.tokens, edge_silence)[0])
        if frames < units:
            raise UserError(f"{it.where}: audio too short for its tokens ({it.duration_s:.3f}s = {frames} "
                            f"frames for {units} tokens); fix the transcript or remove the row")


# --------------------------------------------------------------------------------------------------------------------
# The first pass
# --------------------------------------------------------------------------------------------------------------------
def greedy_per(ctc_logp: torch.Tensor, ids: list[int], blank_id: int = BLANK_ID) -> float:
    """PER (%) of the CTC best path [T, V] against the expected tokens (a cheap transcript-mismatch detector); tokens
    whose id is the blank are not CTC labels (AuxiliaryASR's word space) and do not count."""
    from speechbrain.decoders import ctc_greedy_decode

    from common.metrics import error_rate

    hyp = ctc_greedy_decode(ctc_logp[None], torch.ones(1), blank_id=blank_id)[0]
    return error_rate([i for i in ids if i != blank_id], hyp)


def ctc_gap(ctc_logp: torch.Tensor, ids: list[int], blank_id: int = BLANK_ID) -> float:
    """How badly the transcript fits the audio in the recognizer's own terms: nats per frame by which the
    transcript's CTC log-likelihood falls short of the best path's (about 0 when the recognizer hears the transcript;
    a wrong transcript costs several nats a frame). Tokens whose id is the blank are not CTC labels."""
    labels = [i for i in ids if i != blank_id]
    T = int(ctc_logp.shape[0])
    if not labels or T == 0:
        return 0.0
    lp = ctc_logp.detach().float().cpu()
    nll = torch.nn.functional.ctc_loss(lp[:, None], torch.tensor([labels]), torch.tensor([T]),
                                       torch.tensor([len(labels)]), blank=blank_id, reduction="sum")
    gap = float(nll + lp.max(-1).values.sum()) / T
    return round(gap, 4) if math.isfinite(gap) else 1e3  # infeasible: as bad as it gets


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


class RecognizerScorer:
    """The export's scorer interface for our recognizer (``common/model.py``): waveforms at ``sample_rate`` ->
    CTC log-probs [B, T, V], attention [B, U+1, T] (row u = token u; ``edge_rows`` False: the edge silence slots are
    scored by the CTC blank) and frame counts at ``hop_s`` seconds per frame. ``common.styletts2.StyleTTS2Scorer``
    is the other implementation."""
    edge_rows = False
    blank_id = BLANK_ID

    def __init__(self, modules, hparams):
        from common.model import feature_hop_samples

        self.modules, self.hparams = modules, hparams
        self.sample_rate = int(hparams["sample_rate"])
        self.hop_s = float(hparams["hop_length"]) / 1000.0
        self._hop = feature_hop_samples(hparams)

    def num_frames(self, num_samples: int) -> int:
        return F.num_feature_frames(num_samples, self._hop)

    def scores(self, wavs, lens, ids: list[list[int]], need_attn: bool, use_amp: bool):
        from common.model import batch_tokens_bos

        dev = next(self.modules.parameters()).device
        tok_bos, tok_lens = batch_tokens_bos(ids)
        return _model_scores(self.modules, self.hparams, wavs.to(dev), lens.to(dev), tok_bos.to(dev),
                             tok_lens.to(dev), "joint" if need_attn else "ctc", use_amp)


@dataclass
class LoadedModel:
    """The model the export aligns with: its scorer, vocabulary, and what to record of it."""
    scorer: object  # RecognizerScorer | common.styletts2.StyleTTS2Scorer
    vocab: object  # common.vocab.Vocab | common.styletts2.SymbolVocab
    checkpoint: Path
    family: str  # "recognizer" | "styletts2" | "hf"


def load_model(opts: ExportOptions, device: str) -> LoadedModel:
    """``--styletts2_asr`` (StyleTTS2's checkpoint, used as it is), else the run folder ``--model_dir`` (our
    recognizer, or a fine-tuned StyleTTS2 ASR: its yaml's ``model_family``)."""
    from common import styletts2
    from common.model import load_run

    if opts.first_pass != "recognizer":  # a Hugging Face CTC model (common/hf_first_pass.py)
        from common import hf_first_pass

        scorer, vocab, folder = hf_first_pass.load(opts.first_pass, device)
        return LoadedModel(scorer, vocab, folder, "hf")
    if opts.styletts2_asr:
        asr = styletts2.load_checkpoint(opts.styletts2_asr, opts.styletts2_config, device)
        return LoadedModel(styletts2.StyleTTS2Scorer(asr.model, asr.vocab, opts.styletts2_blank), asr.vocab,
                           asr.checkpoint, "styletts2")
    run = load_run(opts.model_dir, device, min_key=CHECKPOINTS[opts.checkpoint])
    if opts.checkpoint == "joint" and "joint" not in (run.checkpoint_meta or {}):
        raise UserError(f"--checkpoint joint: no checkpoint in {opts.model_dir}/save has a joint score (a run "
                        "trained before checkpoint selection, or with --keep_best_joint False); use --checkpoint per")
    if run.hparams.get("model_family") == "styletts2":
        scorer = styletts2.scorer_from_run(run)
        return LoadedModel(scorer, scorer.vocab, run.checkpoint, "styletts2")
    return LoadedModel(RecognizerScorer(run.modules, run.hparams), run.vocab, run.checkpoint, "recognizer")


def _collate(batch):
    from common.model import batch_wavs

    return [b[0] for b in batch], *batch_wavs([b[1] for b in batch])


class FirstPass:
    """A scorer's scores (``scores``: CTC, attention or joint; ``RecognizerScorer`` or StyleTTS2's), CTC anchoring and
    one batched MAS per length-sorted batch (audio read ahead by a DataLoader worker). ``run(items)`` yields, per
    batch, the indices of its items, their ``Alignment`` rows and their score matrices (for plots). A scorer with
    ``edge_rows`` (StyleTTS2: ``0`` tokens at both ends) always has both edge silence slots. ``refined``: each
    token's confidence is measured on a MAS of the CTC scores (a second one, with the same anchoring, when the pass
    aligns on other scores); ``light``: the pass scores CTC alone (the refiner's stored models replace its
    boundaries)."""

    def __init__(self, scorer, opts: ExportOptions, precision: str, reader: bool = True, refined: bool = False,
                 light: bool = False):
        self.scorer, self.opts = scorer, opts
        self.use_amp = precision == "bf16"
        self.reader = reader  # a DataLoader worker process reads the audio ahead (False: this thread reads it)
        # refined: the refiner replaces these boundaries, so the per-token confidence is measured on the CTC
        # scores' own MAS (the same whichever scores align); light: CTC scores only (no attention decoder), for a
        # stored refiner, which needs nothing else from this pass
        self.refined, self.kind = refined or light, "ctc" if light else opts.scores

    def batches(self, items: list[Item]) -> list[list[int]]:
        """Length-sorted batches of item indices (the longest first), at most ``batch_seconds`` of padded audio."""
        return length_buckets([it.duration_s for it in items], self.opts.batch_seconds, longest_first=True)

    def run(self, items: list[Item], batches: list[list[int]] | None = None
            ) -> Iterator[tuple[list[int], list[Alignment], list[torch.Tensor]]]:
        """Align ``items`` batch by batch (``batches``: default all of ``self.batches(items)``)."""
        o, sc_ = self.opts, self.scorer
        blank, edge_rows = sc_.blank_id, sc_.edge_rows
        batches = self.batches(items) if batches is None else batches
        loader = torch.utils.data.DataLoader(AudioDataset([it.wav for it in items], sc_.sample_rate,
                                                          [it.span for it in items]),
                                             batch_sampler=batches, collate_fn=_collate,
                                             num_workers=1 if len(items) > 1 and self.reader else 0)
        for idx, wavs, lens in loader:
            batch = [items[i] for i in idx]
            tokens, ids = [it.tokens for it in batch], [it.ids for it in batch]
            ctc_logp, attn, frame_lens = sc_.scores(wavs, lens, ids, self.kind != "ctc", self.use_amp)
            ctc_frames = [] if self.refined else None
            units, scores, frames = A.align_batch(ctc_logp, attn, tokens, ids, frame_lens, self.kind, o.ctc_weight,
                                                  blank, o.anchor, o.edge_silence, edge_rows, ctc_frames)
            conf_frames = frames if ctc_frames is None else ctc_frames
            rows = []
            for k, it in enumerate(batch):
                ctc_k = ctc_logp[k, : frame_lens[k]].cpu()
                u, lead, trail = units[k]
                rows.append(Alignment(it, u, lead, trail, frames[k], sc_.hop_s,
                                      A.token_confidence(ctc_k, it.ids, conf_frames[k], lead, blank),
                                      greedy_per(ctc_k, it.ids, blank), ctc_gap=ctc_gap(ctc_k, it.ids, blank)))
            yield list(idx), rows, scores


# --------------------------------------------------------------------------------------------------------------------
# The export
# --------------------------------------------------------------------------------------------------------------------
def _remove_stale_temps(folders) -> None:
    """Temp files of a run that was killed mid-write (``.name.XXXX.tmp``, see common.io.atomic_path)."""
    for d in folders:
        if Path(d).is_dir():
            for tmp in Path(d).glob(".*.tmp"):
                tmp.unlink(missing_ok=True)


def export_corpus(opts: ExportOptions, fit_refiner: bool = False) -> dict:
    """Run the export; returns the report (as written to ``export_report.json``) with its ``timing`` added. Under
    ``torchrun --nproc_per_node N`` every process aligns whole batches of one plan, round-robin (the refiner and the
    HMM-GMMs are trained once, by rank 0, and shared; a stored refiner is read by each), rank 0 writes every file
    and returns the report, the other processes return {}: the files are those a single process writes.
    ``fit_refiner``: train the refiner on every row and save it (``refiner_path``), write no durations; returns
    {"refiner": its path, "rows": the rows it was trained on, "timing": ...}."""
    from tqdm import tqdm

    from common.run_report import peak_memory_mb, provenance

    t0 = time.time()
    timing: dict = {}
    if fit_refiner:  # nothing is written: Matcha's mel lengths are not needed
        opts = dataclasses.replace(opts, no_mels=True)
    device = resolve_device(opts.device)
    shard = Shard.from_env(device)  # under torchrun: this process's share (common/ddp.py); else all of it
    if shard.world > 1 and device == "cuda":
        device = f"cuda:{torch.cuda.current_device()}"
    precision = resolve_precision(opts.precision, device)
    cal = Calibration.load(opts.calibration) if opts.calibration else None
    reference = calibration.load_reference(opts.labelled) if opts.labelled else None
    model = load_model(opts, device)
    src = phoneme_source(opts)
    items = prepare_items(opts, model.vocab, src)
    units = U.ExportUnits(src, model.vocab)  # spm: piece spans -> symbols after the first pass
    check_feasible(items, model.scorer, opts.edge_silence)
    report_dir = opts.corpus / "durations"
    align_file = report_dir / ALIGNMENTS_FILE
    fitted = None
    if fit_refiner and not opts.refine:
        raise UserError("--fit_refiner with --refine False: there is no refiner to train")
    if opts.refine and not fit_refiner:
        fitted, timing["refiner"] = load_refiner(opts, model, model.vocab, reference is not None)
        if opts.progress and shard.main and fitted is None and opts.refiner_model == "auto" and reference is None:
            print(f"refiner: {timing['refiner']}; it is saved to {refiner_path(opts)} for the next export",
                  flush=True)
    todo = items if fit_refiner else [it for it in items if opts.overwrite or not it.out.is_file()]
    shard.barrier()  # every process has seen what is already written before rank 0 cleans up
    if shard.main and not fit_refiner:
        _remove_stale_temps({it.out.parent for it in items} | {report_dir})
        if opts.overwrite and align_file.is_file():
            align_file.unlink()
    results: dict[str, dict] = {}
    failures: dict[str, str] = {}
    refining = opts.refine and bool(todo)
    need_all = refining or (reference is not None and bool(todo))  # the refiner learns from every row, even those
    # already written; rows longer than long_row_s are aligned in pieces (joined again before writing)
    first, pieces = long_rows.split(items if need_all else todo, model.scorer, opts.long_rows) \
        if opts.long_row_s > 0 else (items if need_all else todo, {})
    collect = need_all or bool(pieces)  # every row's first pass before writing any
    labelled = {}
    if reference is not None and collect:
        labelled = {i: reference[it.rel] for i, it in enumerate(first) if it.rel in reference and it.span is None}
        if not labelled:
            raise UserError(f"{opts.labelled}: none of its {len(reference)} row(s) is in {opts.corpus}'s metadata; "
                            f"name them by rel_path (e.g. {first[0].rel if first else 'voice/utt'})")
    plots_left = opts.plots if shard.main and not fit_refiner else 0
    models = {} if fitted is None else None  # the models trained here (saved for the next export)
    refiner = Refinement(first, units, model.scorer, units.vocab, device, opts, timing, shard, fitted, models) \
        if refining else None
    # stored models align beside the first pass (one thread each: it hardly uses a second one on CPU)
    early = refiner is not None and not labelled and refiner.start()
    previous = set_threads(1) if early else None
    # (no reader process beside a running thread: a fork can copy a lock that thread holds and hang the child)
    # a stored refiner needs nothing from the first pass but its rows and their review figures: CTC scores do
    light = refiner is not None and refiner.light()
    first_pass = FirstPass(model.scorer, opts, precision, reader=not early, refined=refiner is not None, light=light)
    if light:
        timing["first_pass_scores"] = "ctc (light_first_pass: the stored refiner replaces its boundaries)"
    batches = first_pass.batches(first)
    bar = tqdm(total=len(first), desc="export" if not collect else "first pass", unit="utt",
               disable=not (opts.progress and shard.main))
    # one process without refinement: a background thread writes each finished batch (in order) while the next one
    # runs; otherwise the rows are kept (in item order) for the refiner, and under torchrun gathered from every
    # process (each ran whole batches of the same plan, round-robin) and written by rank 0
    streaming = not collect and shard.world == 1
    writer, written, mine = ThreadPoolExecutor(max_workers=1, thread_name_prefix="export-writer"), [], {}
    try:
        for k, (idx, rows, scores) in enumerate(first_pass.run(first, shard.take(batches))):
            for a, sc in zip(rows, scores):
                if plots_left > 0:
                    _plot(a, sc.cpu(), report_dir / "plots")
                    plots_left -= 1
            units.expand(rows)
            if streaming:
                _calibrate(rows, cal)
                written.append(writer.submit(_write_all, rows, opts, align_file, results, failures))
            else:
                mine[shard.rank + k * shard.world] = list(zip(idx, rows))  # the batch's number in the plan
            bar.update(len(rows) * shard.world)
    except BaseException:
        if refiner is not None:
            refiner.close()
        raise
    finally:
        writer.shutdown(wait=True)
        if previous is not None:
            set_threads(*previous)
    if refiner is not None:
        refiner.first_pass_done()
    audio_s = sum(f.result() for f in written)
    bar.close()
    passed: list[Alignment] = [None] * len(first)  # type: ignore[list-item]  # in item order
    in_batch_order = []
    for _, pairs in sorted(shard.gather(mine).items()):
        for i, a in pairs:
            passed[i] = a
            in_batch_order.append(a)
    timing["first_pass_s"] = round(time.time() - t0, 2)
    refine_stats = refiner.apply(passed, labelled) if refiner is not None else None
    if not shard.main:
        return {}
    if refine_stats is not None:
        path = refiner_path(opts)
        if fitted is None:  # trained here: saved for the next export (one trained with --labelled rows only when
            # asked for, --fit_refiner: they are this export's input, not the corpus')
            saved = fit_refiner or (opts.refiner_model in ("auto", "fit") and not labelled)
            if saved:
                save_refiner(path, models, refine_stats, opts, model, units.vocab, len(passed),
                             sum(a.item.duration_s for a in passed))
            fitted = {"file": str(path) if saved else None, "corpus": str(opts.corpus), "rows": len(passed)}
        refine_stats = {**refine_stats, "refiner": {"file": fitted["file"], "fitted_on": fitted["corpus"],
                                                    "fitted_rows": fitted["rows"]}}
    if fit_refiner:
        timing["seconds"] = round(time.time() - t0, 2)
        return {"refiner": refiner_path(opts), "rows": len(passed), "timing": timing}
    if not streaming and not collect:  # torchrun without refinement: rank 0 writes every row, in the plan's order
        _calibrate(in_batch_order, cal)
        audio_s += _write_all(in_batch_order, opts, align_file, results, failures)
    cal_info = None if cal is None else {"file": str(opts.calibration), "boundaries": cal.boundaries}
    if labelled:
        cal = _fit_labelled(passed, labelled, report_dir / "calibration.json", opts)
        cal_info = {"labelled": str(opts.labelled), "labelled_rows": len(labelled), "boundaries": cal.boundaries,
                    "file": str(report_dir / "calibration.json")}
    if pieces:
        passed = long_rows.rejoin(passed, pieces, {it.rel: units.item(it) for it in items})
    if collect:
        t = time.time()
        _calibrate(passed, cal)
        todo_rels = {it.rel for it in todo}
        audio_s += _write_all([a for a in passed if a.item.rel in todo_rels], opts, align_file, results, failures)
        timing["write_s"] = round(time.time() - t, 2)
    flags, flag_rule = review_flags(results, opts.flag_rule, opts.flag_z, opts.flag_min_rows, opts.low_conf,
                                    opts.high_per)
    report = {
        "corpus": str(opts.corpus),
        "model_dir": None if opts.styletts2_asr or opts.first_pass != "recognizer" else str(opts.model_dir),
        "checkpoint": str(model.checkpoint), "model_family": model.family,
        "made_by": provenance(), "options": opts.as_record(), "phonemes": {k: str(v) if isinstance(v, Path) else v
                                                                            for k, v in src.items()},
        "device": device, "precision": precision, "scores": opts.scores, "format": opts.format,
        "add_blank": opts.add_blank, "hop_length": opts.hop_length,
        "mel_lengths_from": "audio" if opts.no_mels else "mels/",
        "counts": {"success": len(results), "failure": len(failures), "skipped_existing": len(items) - len(todo),
                   "total": len(items)},
        "failures": dict(sorted(failures.items())),
        "flagged": {rel: f for rel, f in sorted(flags.items()) if f},
        "flag_rules": {**flag_rule, "long_phone": f"a phone longer than {opts.max_phone_s}s"},
        "utterances": {rel: {**{k: r[k] for k in ("confidence", "greedy_per", "ctc_gap", "hmm_fit",
                                                   "refine_confidence", "frames") if r.get(k) is not None},
                             "flags": flags[rel]}
                       for rel, r in sorted(results.items())},
        "refine": refine_stats,
        "calibration": cal_info,
        "pieces": {rel: len(p) for rel, p in sorted(pieces.items())},  # long rows aligned in pieces
    }
    write_json(report_dir / REPORT_FILE, report)
    elapsed = time.time() - t0
    timing.update(processes=shard.world, peak_memory_mb=round(peak_memory_mb(device), 1), seconds=round(elapsed, 2),
                  audio_seconds=round(audio_s, 2),
                  realtime_factor=round(audio_s / elapsed, 1) if elapsed > 0 else None)
    write_json(report_dir / TIMING_FILE, timing)
    return {**report, "timing": timing}


class Refinement:
    """The refiner's run over the rows of an export (``common.refine.refine_boundaries``): in this thread after the
    first pass (``apply`` runs it), or, with stored models (``fitted``) in one process, ``start`` it in a thread beside
    the first pass: stored models need nothing from the first pass (its boundaries are neither a starting point nor,
    with ``fusion_first_pass`` 0, a member), so the two share the cores. ``apply`` then moves each first-pass
    alignment to the refined boundaries. ``rows``: the items the first pass aligns (long rows' pieces included),
    in order; ``labelled[i]``: reference segments of row ``i``, whose boundaries become the refiner's training
    labels for that row; ``fitted``: a stored refiner (``load_refiner``), ``fit_out``: a dict that receives the
    models trained here."""

    def __init__(self, rows: list[Item], units, scorer, vocab, device: str, opts: ExportOptions, timing: dict,
                 shard: Shard, fitted: dict | None = None, fit_out: dict | None = None):
        from common.refine import unit_label_ids

        self.rows, self.vocab, self.device, self.opts, self.timing, self.shard = rows, vocab, device, opts, timing, \
            shard
        self.stored, self.fit_out, self.future, self.pool, self.helper = fitted, fit_out, None, None, None
        self.fitted = None if fitted is None else fitted["models"]
        self.cfg = dataclasses.replace(opts.refiner, precision=resolve_precision(opts.precision, device))
        edges = opts.edge_silence or scorer.edge_rows  # the units the first pass aligns (FirstPass.run)
        self.unit_ids = []
        for it in rows:
            _, lead, trail = A.alignment_units(it.tokens, edges)
            self.unit_ids.append(unit_label_ids(units.item(it).ids, lead, trail, BLANK_ID))

    def _call(self, first_ends: list | None, fixed: dict, threads: int = 0):
        from common.audio import load_audio
        from common.landmarks import ClosureSnap
        from common.refine import refine_boundaries

        opts, cfg, vocab = self.opts, self.cfg, self.vocab
        if threads:  # a thread beside the first pass: its own thread count (torch's is per thread)
            set_threads(threads)
        log = (lambda m: print(m, flush=True)) if opts.progress and self.shard.main else None
        index = getattr(vocab, "index", {})  # the units' silence classes: the edge slots' (blank) and pau's
        hmm = dataclasses.replace(opts.hmm_aligner, silence_ids=(BLANK_ID, *sorted(index[t] for t in SILENCE_TOKENS
                                                                                   if t in index)))
        return refine_boundaries(
            lambda i: load_audio(self.rows[i].wav, cfg.sample_rate, self.rows[i].span)[0],
            [it.duration_s for it in self.rows], self.unit_ids,
            first_ends if first_ends is not None else [None] * len(self.rows), len(vocab), cfg, hmm,
            opts.hmm_weight, opts.hmm_flat_start_schedule, self.device, log, fixed, self.timing, self.shard,
            opts.fusion, opts.fusion_first_pass,
            [SIL if k == BLANK_ID else t for k, t in enumerate(vocab.tokens)],  # class 0: the edge silence slots
            opts.hmm_init, opts.fusion_gate_ms / 1000.0, opts.hmm_flat_single,
            ClosureSnap(opts.closure_snap, *map(float, opts.closure_window_ms), opts.closure_offset_ms),
            opts.fusion_precision, dataclasses.replace(opts.boundary_detector, precision=cfg.precision),
            opts.hmm_concurrent and not threads, self.fitted, self.fit_out, self.helper)

    def start(self) -> bool:
        """With stored models, one process and the first pass not a member: run in a thread now (one thread of
        its own; the caller gives the first pass one, then ``first_pass_done()``: a helper thread joins the
        stored HMM-GMMs' jobs); False where it must wait for the first pass."""
        from common.refine import Helper

        if self.fitted is None or self.shard.world > 1 or self.opts.fusion_first_pass > 0 or \
                self.cfg.rounds <= 0 or not self.device.startswith("cpu"):  # (without the classifier the first
            return False  # pass's boundaries are the fallback of rows no HMM-GMM aligns)
        self.helper = Helper()
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="export-refiner")
        self.future = self.pool.submit(self._call, None, {}, 1)
        return True

    def light(self) -> bool:
        """A first pass on CTC scores alone serves these stored models (``light_first_pass``): its boundaries are
        neither a starting point nor a member (``fusion_first_pass`` 0), every row is refined (the classifier
        aligns them all), and nothing shows the first pass's own boundaries (plots, ``dump_members``)."""
        o = self.opts
        return self.fitted is not None and o.light_first_pass and o.fusion_first_pass <= 0 and \
            self.cfg.rounds > 0 and o.plots <= 0 and not o.dump_members

    def first_pass_done(self) -> None:
        if self.helper is not None:
            self.helper.open()

    def close(self) -> None:
        if self.helper is not None:
            self.helper.close()
        if self.pool is not None:
            self.pool.shutdown(wait=True)

    def apply(self, passed: list[Alignment], labelled: dict) -> dict:
        """Replace every first-pass alignment by the refined one; returns the refiner's stats."""
        from common.refine import cap_final_phone

        opts, cfg = self.opts, self.cfg
        first_ends = [a.unit_ends() for a in passed]
        if any(a.unit_ids() != u for a, u in zip(passed, self.unit_ids)):
            raise RuntimeError("the first pass aligned other units than the refiner was given")  # a bug, not input
        if self.future is not None:
            try:
                ends, grid_s, confs, stats, members = self.future.result()
            finally:
                self.close()
            members["first_pass"] = first_ends
        else:
            fixed = {i: calibration.pin_to_reference(passed[i].units, first_ends[i], ref, cfg.hop_ms / 1000.0)
                     for i, ref in labelled.items()}
            ends, grid_s, confs, stats, members = self._call(first_ends, fixed)
        fits = stats.pop("row_fit", None) or [None] * len(passed)
        if self.stored is not None:  # the training's stats, with what these rows give of the rest
            stats = {**self.stored["stats"], **{k: stats[k] for k in ("hmm_tied_units", "closures_snapped")
                                                if k in stats}}
        if opts.final_cap > 0:
            stats["final_capped"] = cap_final_phone([a.units for a in passed], ends, opts.final_cap, SILENCE_TOKENS)
        for i, (a, e, rc) in enumerate(zip(passed, ends, confs)):
            a.frames = F.ends_to_counts(e, int(round(a.item.duration_s / grid_s)), grid_s)
            a.hop_s, a.refine_confidence, a.hmm_fit = grid_s, rc, fits[i]
            if opts.dump_members:
                a.members = {k: v[i] for k, v in members.items() if v[i] is not None}
        return stats


def _fit_labelled(passed: list[Alignment], labelled: dict, out: Path, opts: ExportOptions) -> Calibration:
    """Calibration offsets from the labelled rows of this export (``common/calibration.py``), saved to ``out``."""
    samples = []
    for i, ref in labelled.items():
        a = passed[i]
        samples += calibration.boundary_samples(a.item.spk, a.units, a.unit_ends(), ref)
    cal = calibration.fit(samples, info={"utterances": len(labelled), "boundaries": len(samples),
                                         "reference": str(opts.labelled), "refined": opts.refine})
    cal.save(out)
    return cal


def _calibrate(rows: list[Alignment], cal: Calibration | None) -> None:
    """Move each utterance's boundaries by the calibrated offsets of their types (``common/calibration.py``)."""
    if cal is None:
        return
    for a in rows:
        a.move_to(calibration.apply(a.units, a.unit_ends(), a.item.spk, cal, a.hop_s))


def _write_all(rows: list[Alignment], opts: ExportOptions, align_file: Path, results: dict, failures: dict) -> float:
    """Write every finished utterance; returns the seconds of audio written."""
    audio_s = 0.0
    for a in rows:
        try:
            results[a.item.rel] = _write_one(a, opts, align_file)
            audio_s += a.item.duration_s
        except (UserError, ValueError, OSError) as err:
            failures[a.item.rel] = str(err)
    return audio_s


def _write_one(a: Alignment, opts: ExportOptions, align_file: Path) -> dict:
    """One utterance's files: the duration file, its ``alignments.jsonl`` line, its TextGrid; returns its report
    entry (the statistics the review flags are drawn from, ``common/review.py``, and the frame total)."""
    it = a.item
    seq, durs = export_durations(a.units, a.frames, asr_frame_s=a.hop_s, num_frames=it.mel_frames,
                                 sample_rate=it.sr, hop_length=opts.hop_length, add_blank=opts.add_blank,
                                 duration_s=it.duration_s)
    unit_ends = a.unit_ends()
    phone_s = np.diff(np.concatenate([[0.0], unit_ends]))
    extra = {}
    if a.members:
        extra["member_ends_s"] = {k: [round(float(x), 5) for x in v] for k, v in a.members.items()}
    rc = None if a.refine_confidence is None else a.refine_confidence[1 if a.lead else 0:][: len(it.ids)]
    if rc is not None:
        extra["refine_confidence"] = [round(float(c), 4) for c in rc]
    rec = alignment_record(it.rel, seq, durs, add_blank=opts.add_blank, sample_rate=it.sr,
                           hop_length=opts.hop_length, aligned_tokens=a.units,
                           aligned_ends_s=[round(float(e), 5) for e in unit_ends],
                           confidence=[round(float(c), 4) for c in a.confidence], speaker=it.spk, **extra)
    append_alignment(align_file, rec)
    if opts.textgrid:
        from common.boundary_eval import spans_from_ends
        from common.textgrid import words_from_spans, write_textgrid

        spans = spans_from_ends(a.units, unit_ends)
        tg = safe_join(opts.corpus / "textgrids", it.rel + ".TextGrid", it.where)
        write_textgrid(tg, [s for s in spans if s.label != SIL], words_from_spans(spans), it.duration_s)
    write_durations(it.out, durs, opts.format)
    return {"confidence": round(float(a.confidence.mean()), 4), "greedy_per": round(a.greedy_per, 2),
            "ctc_gap": a.ctc_gap, "hmm_fit": a.hmm_fit, "frames": int(durs.sum()),
            "refine_confidence": None if rc is None else round(float(np.mean(rc)), 4),
            "long_phone": bool(np.any(phone_s[[t not in SILENCE_TOKENS for t in a.units]] > opts.max_phone_s))}


def _plot(a: Alignment, scores: torch.Tensor, out_dir: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from common.audio import load_audio
    from common.io import atomic_path

    it, hop_s = a.item, a.hop_s
    wav, sr = load_audio(it.wav)
    S = scores.numpy()
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(12, 6), sharex=False)
    ax1.specgram(wav.numpy(), NFFT=512, Fs=sr, noverlap=384, cmap="magma")
    ends = np.cumsum(a.frames)
    for e in ends:
        ax1.axvline((e - 0.5) * hop_s, color="c", lw=0.6)
    starts = np.concatenate([[0], ends[:-1]])
    for s, e, t in zip(starts, ends, a.units):
        ax1.text(((s + e) / 2 - 0.5) * hop_s, sr * 0.45, t, color="w", ha="center", fontsize=7)
    ax1.set_ylabel("Hz")
    ax1.set_title(f"{it.rel}: audio with phone boundaries")
    ax2.imshow(np.maximum(S, -20), aspect="auto", origin="lower", interpolation="nearest")
    path_t = np.arange(int(ends[-1]))
    ax2.plot(path_t, np.searchsorted(ends, path_t, side="right"), "r-", lw=0.8)
    ax2.set_xlabel("encoder frame (10 ms)")
    ax2.set_ylabel("token")
    ax2.set_title("alignment scores with the MAS path")
    fig.tight_layout()
    target = safe_join(out_dir, it.rel.replace("/", "__") + ".png", it.where)
    with atomic_path(target) as tmp:
        fig.savefig(tmp, format="png", dpi=90)
    plt.close(fig)
