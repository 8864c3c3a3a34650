"""Synthesize a small multi-speaker corpus with exact phone timings (the built-in ground truth).

    python data_prep/synth_corpus.py OUT [--num_utts 100] [--voices kal,ked,slt] [--seed 0]
        [--sample_rate 22050] [--rates 0.85,1.0,1.2 | --rates 0.8:1.25] [--sentences FILE]
        [--espeak_langs fr-fr,de --espeak_utts 20] [--jobs 2] [--overwrite]

Writes the Matcha layout (see shared design, "Built-in corpus and ground truth"):

- ``OUT/wavs/<voice>/<voice>_<nnnn>.wav``  mono 16-bit PCM at one sample rate for the whole corpus
- ``OUT/metadata.csv``   ``rel_path|spk_id|language|text`` (rel_path = ``<voice>/<id>``, no ``.wav``)
- ``OUT/phones.tsv``     ``rel_path<TAB>festival phones<TAB>end times (s)``, one line per *festival* utterance
- ``OUT/corpus_info.json``  voices, speaker ids, per-utterance rate/sentence/duration, seed, counts

Ground-truth timing rules (what ``phones.tsv`` means exactly):

- Phones and end times come from festival's ``utt.save.segs`` (silence is ``pau``); the first phone starts at 0.
- The last end time equals the written wav's duration (``num_samples / sample_rate``). Festival's diphone voices
  (kal, ked) write ~20-30 ms of silent overlap-add tail after the last segment end; that tail is given to the
  final ``pau`` rather than cut from the audio. The HTS voice (slt) wave already ends exactly at the last end.
- Speaking rate: ``Duration_Stretch`` (> 1 = slower). The HTS engine ignores that parameter, so for HTS voices
  the same value is passed as hts_engine's speed ``-r 1/stretch``; festival's segment times are then the
  HTS state durations, i.e. exactly what was synthesized.
- espeak-ng rows (``--espeak_langs``) are extra audio in other languages for G2P/multilingual tests: they are in
  ``metadata.csv`` with their language, but have **no** ``phones.tsv`` line (espeak-ng gives no timings).

Festival starts slowly compared to one utterance, so each worker runs one festival process over a generated
Scheme script for many utterances; up to ``--jobs`` (default 2) such processes run at once, and each finished
utterance is resampled and written as soon as festival reports it.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import random  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from concurrent.futures import ThreadPoolExecutor  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from typing import Sequence  # noqa: E402

import numpy as np  # noqa: E402
import soundfile as sf  # noqa: E402

from common.io import UserError, atomic_path, atomic_write, cli  # noqa: E402

SENTENCE_DIR = Path(__file__).resolve().parent / "sentences"
DEFAULT_VOICES = ("kal", "ked", "slt")
DEFAULT_RATES = (0.85, 1.0, 1.2)
ESPEAK_WPM = 175  # espeak-ng's default speed; a rate r becomes round(175 / r) words per minute
# Short name -> (festival voice function, Debian/Ubuntu package that provides it).
FESTIVAL_VOICES = {
    "kal": ("voice_kal_diphone", "festvox-kallpc16k"),
    "ked": ("voice_ked_diphone", "festvox-kdlpc16k"),
    "slt": ("voice_cmu_us_slt_arctic_hts", "festvox-us-slt-hts"),
    "rab": ("voice_rab_diphone", "festvox-rablpc16k"),
    "awb": ("voice_cmu_us_awb_cg", "festvox-us-awb-cg"),
}
# Typographic punctuation mapped to ASCII before the text reaches festival's Scheme reader.
_ASCII_MAP = str.maketrans({"\u2018": "'", "\u2019": "'", "\u201c": "", "\u201d": "", "\u2013": "-",
                            "\u2014": " - ", "\u2026": "...", "\u00a0": " "})


@dataclass
class Job:
    """One utterance to synthesize."""

    voice: str  # folder name under wavs/
    utt_id: str
    text: str
    rate: float
    language: str
    spk_id: int
    sentence_line: int  # 1-based line in the sentence file
    engine: str  # "festival" | "espeak"
    engine_voice: str  # festival voice function or espeak-ng voice name

    @property
    def rel_path(self) -> str:
        return f"{self.voice}/{self.utt_id}"


# ----------------------------------------------------------------------------------------------- inputs
def read_sentences(path: str | os.PathLike, ascii_only: bool = True) -> list[tuple[int, str]]:
    """Non-empty, non-comment lines of a sentence file as ``(line_number, text)``."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: sentence file not found; give one sentence per line (--sentences)")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as err:
        raise UserError(f"{path}: not UTF-8 text ({err.reason}); save the sentence file as UTF-8") from None
    out = []
    for no, line in enumerate(lines, 1):
        text = " ".join(line.translate(_ASCII_MAP).split())
        if not text or text.startswith("#"):
            continue
        if "|" in text:
            raise UserError(f"{path}:{no}: '|' is the metadata.csv separator and cannot appear in a sentence")
        if ascii_only and not text.isascii():
            bad = "".join(sorted({c for c in text if not c.isascii()}))
            raise UserError(f"{path}:{no}: non-ASCII character(s) {bad!r}; festival's English voices read "
                            "ASCII only (spell them out or remove them)")
        if not any(c.isalpha() for c in text):
            raise UserError(f"{path}:{no}: {text!r} has no letters to speak (festival crashes on such lines)")
        out.append((no, text))
    if not out:
        raise UserError(f"{path}: no sentences (empty file, or only blank/# lines)")
    return out


def parse_voices(spec: str | Sequence[str]) -> dict[str, str]:
    """``kal,ked,slt`` or ``name=festival_voice_function`` items -> ordered {name: voice function}."""
    items = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec) if s.strip()]
    if not items:
        raise UserError("--voices is empty; give e.g. kal,ked,slt")
    voices: dict[str, str] = {}
    for item in items:
        name, _, fn = item.partition("=")
        name, fn = name.strip(), fn.strip()
        if not fn:
            if name not in FESTIVAL_VOICES:
                raise UserError(f"unknown voice {name!r}; known: {', '.join(FESTIVAL_VOICES)} "
                                "(or name=festival_voice_function, e.g. rab=voice_rab_diphone)")
            fn = FESTIVAL_VOICES[name][0]
        if not name.replace("_", "").replace("-", "").isalnum() or not fn.replace("_", "").isalnum():
            raise UserError(f"bad voice item {item!r}; use letters, digits, '-' and '_' only")
        if name in voices:
            raise UserError(f"voice {name!r} given twice in --voices")
        voices[name] = fn
    return voices


def parse_rates(spec: str | Sequence[float]) -> tuple[str, tuple[float, ...]]:
    """``0.85,1.0,1.2`` -> ("choice", values); ``0.8:1.25`` -> ("uniform", (lo, hi))."""
    if isinstance(spec, str):
        s = spec.strip()
        try:
            if ":" in s:
                lo, hi = (float(x) for x in s.split(":"))
                kind, values = "uniform", (lo, hi)
                if lo > hi:
                    raise UserError(f"--rates {spec!r}: range low > high")
            else:
                kind, values = "choice", tuple(float(x) for x in s.split(",") if x.strip())
        except ValueError:
            raise UserError(f"--rates {spec!r}: give numbers like 0.85,1.0,1.2 or a range 0.8:1.25") from None
    else:
        kind, values = "choice", tuple(float(x) for x in spec)
    if not values:
        raise UserError("--rates is empty; give e.g. 0.85,1.0,1.2")
    for v in values:
        if not (0.3 <= v <= 3.0):
            raise UserError(f"--rates: Duration_Stretch {v} outside the sensible range 0.3..3.0")
    return kind, values


def check_festival(voices: dict[str, str]) -> dict[str, int]:
    """Festival installed and every voice defined (else one line naming the apt package); return each voice's
    native sample rate, read from one tiny synthesis per voice."""
    if shutil.which("festival") is None:
        raise UserError("festival not found; install it (apt-get install festival festvox-kallpc16k "
                        "festvox-kdlpc16k festvox-us-slt-hts)")
    with tempfile.TemporaryDirectory(prefix="synth_probe_") as tmp:
        probe = []
        for name, fn in voices.items():
            wav = _scheme_str(str(Path(tmp) / f"{name}.wav"))
            probe.append(f"(if (symbol-bound? '{fn}) (begin ({fn}) (utt.save.wave (SynthText \"a\") {wav} 'riff)))")
        res = subprocess.run(["festival", "--pipe"], input="\n".join(probe) + "\n", capture_output=True,
                             text=True, timeout=120)
        rates = {}
        for name, fn in voices.items():
            wav = Path(tmp) / f"{name}.wav"
            if not wav.is_file():
                pkg = next((p for fnc, p in FESTIVAL_VOICES.values() if fnc == fn), None)
                hint = f"apt-get install {pkg}" if pkg else "install the festvox package that provides it"
                err = res.stderr.strip().splitlines()
                raise UserError(f"festival voice {name!r} ({fn}) is not installed or does not work; {hint}"
                                + (f" (festival said: {err[-1]})" if err else ""))
            rates[name] = sf.info(str(wav)).samplerate
    return rates


def check_espeak(langs: Sequence[str]) -> None:
    if shutil.which("espeak-ng") is None:
        raise UserError("espeak-ng not found; install it (apt-get install espeak-ng) or drop --espeak_langs")
    for lang in langs:
        res = subprocess.run(["espeak-ng", "-v", lang, "-q", "test"], capture_output=True, text=True, timeout=60)
        if res.returncode != 0:
            raise UserError(f"espeak-ng has no voice {lang!r} ({res.stderr.strip() or 'failed'}); "
                            "see `espeak-ng --voices` for names like fr-fr, de, es")


def prepare_out_dir(out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"{out_dir}: exists and is not a folder")
    if out_dir.is_dir() and any(out_dir.iterdir()):
        if not overwrite:
            raise UserError(f"{out_dir}: folder is not empty; pick a new OUT or pass --overwrite "
                            "(deletes OUT/wavs, metadata.csv, phones.tsv, corpus_info.json)")
        shutil.rmtree(out_dir / "wavs", ignore_errors=True)
        for name in ("metadata.csv", "phones.tsv", "corpus_info.json"):
            (out_dir / name).unlink(missing_ok=True)
    (out_dir / "wavs").mkdir(parents=True, exist_ok=True)


# ------------------------------------------------------------------------------------------------ plan
def _pick_lines(rng: random.Random, n_avail: int, n: int) -> list[int]:
    """``n`` indices into ``n_avail`` sentences: a shuffled pass without repeats, then further passes."""
    out: list[int] = []
    while len(out) < n:
        order = list(range(n_avail))
        rng.shuffle(order)
        out.extend(order[: n - len(out)])
    return out


def _draw_rate(rng: random.Random, kind: str, values: tuple[float, ...]) -> float:
    if kind == "uniform":
        return round(rng.uniform(values[0], values[1]), 3)
    return values[rng.randrange(len(values))]


def plan_jobs(sentences, voices: dict[str, str], num_utts: int, seed: int, rates, espeak_langs,
              espeak_utts: int, espeak_sentences: dict[str, list]) -> list[Job]:
    """Deterministic list of utterances: voices round-robin, sentences shuffled, one rate each."""
    rng = random.Random(seed)
    kind, values = rates
    jobs: list[Job] = []
    names = list(voices)
    counters = {v: 0 for v in names}
    for i, idx in enumerate(_pick_lines(rng, len(sentences), num_utts)):
        voice = names[i % len(names)]
        line, text = sentences[idx]
        jobs.append(Job(voice, f"{voice}_{counters[voice]:04d}", text, _draw_rate(rng, kind, values), "en-us",
                        names.index(voice), line, "festival", voices[voice]))
        counters[voice] += 1
    picks = {lang: iter(_pick_lines(rng, len(espeak_sentences[lang]), espeak_utts)) for lang in espeak_langs}
    for i in range(espeak_utts):
        lang = espeak_langs[i % len(espeak_langs)]
        folder = f"espeak-{lang}"
        line, text = espeak_sentences[lang][next(picks[lang])]
        counters.setdefault(folder, 0)
        jobs.append(Job(folder, f"{folder}_{counters[folder]:04d}", text, _draw_rate(rng, kind, values), lang,
                        len(names) + list(espeak_langs).index(lang), line, "espeak", lang))
        counters[folder] += 1
    return jobs


# ------------------------------------------------------------------------------------------- festival
def _scheme_str(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def festival_script(jobs: Sequence[Job], work: Path) -> str:
    """Scheme program synthesizing ``jobs`` in order; reports ``DONE id`` / ``FAIL id`` on stderr."""
    lines = [
        "(define (sc_set_voice fn)",
        "  (eval (list fn))",
        "  (set! sc_is_hts (string-equal (Param.get 'Synth_Method) \"HTS\"))",
        "  (set! sc_hts_base (if sc_is_hts hts_engine_params nil)))",
        "(define (sc_synth id text stretch wav segs)",
        "  (Parameter.set 'Duration_Stretch stretch)",
        "  (if sc_is_hts",
        "      (set! hts_engine_params (append sc_hts_base (list (list \"-r\" (/ 1.0 stretch))))))",
        "  (set! sc_utt (SynthText text))",
        "  (utt.save.wave sc_utt wav 'riff)",
        "  (utt.save.segs sc_utt segs)",
        "  (format stderr \"DONE %s\\n\" id))",
    ]
    current = None
    for job in jobs:
        if job.engine_voice != current:
            lines.append(f"(sc_set_voice '{job.engine_voice})")
            current = job.engine_voice
        wav, segs = work / f"{job.utt_id}.wav", work / f"{job.utt_id}.segs"
        call = (f"(sc_synth {_scheme_str(job.utt_id)} {_scheme_str(job.text)} {job.rate!r} "
                f"{_scheme_str(str(wav))} {_scheme_str(str(segs))})")
        lines.append(f"(unwind-protect {call} (format stderr \"FAIL %s\\n\" {_scheme_str(job.utt_id)}))")
    return "\n".join(lines) + "\n"


def read_segs(path: Path) -> tuple[list[str], list[float]]:
    """Festival's ``utt.save.segs`` (header, ``#``, then ``end_time 100 phone``) -> phones, end times."""
    phones, ends, body = [], [], False
    for line in path.read_text().splitlines():
        if not body:
            body = line.strip() == "#"
            continue
        parts = line.split()
        if len(parts) >= 3:
            ends.append(float(parts[0]))
            phones.append(parts[2])
    if not phones:
        raise RuntimeError(f"{path}: festival wrote no segments")
    return phones, ends


# ---------------------------------------------------------------------------------------------- audio
_RESAMPLERS: dict = {}
_RESAMPLERS_LOCK = threading.Lock()


def _resample(x: np.ndarray, sr_in: int, sr_out: int) -> np.ndarray:
    """Band-limited resampling (Kaiser-windowed sinc, librosa's "kaiser_best" settings); kernels are cached."""
    if sr_in == sr_out:
        return x
    import torch
    import torchaudio

    with _RESAMPLERS_LOCK:
        if (sr_in, sr_out) not in _RESAMPLERS:
            _RESAMPLERS[sr_in, sr_out] = torchaudio.transforms.Resample(
                sr_in, sr_out, lowpass_filter_width=16, rolloff=0.945, resampling_method="sinc_interp_kaiser",
                beta=14.769656459379492)
        resampler = _RESAMPLERS[sr_in, sr_out]
    with torch.no_grad():
        return resampler(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))).numpy()


def write_wav(path: Path, x: np.ndarray, sr: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        sf.write(str(tmp), np.clip(x, -1.0, 32767 / 32768), sr, subtype="PCM_16", format="WAV")


def finish_audio(job: Job, src_wav: Path, out_dir: Path, target_sr: int | None) -> dict:
    """Read the engine's wav, mono, resample, write; return facts for metadata/info."""
    x, sr = sf.read(str(src_wav), dtype="float32", always_2d=True)
    x = x.mean(axis=1)
    sr_out = target_sr or sr
    y = _resample(x, sr, sr_out)
    write_wav(out_dir / "wavs" / f"{job.rel_path}.wav", y, sr_out)
    return {"native_sr": sr, "num_samples": int(len(y)), "duration": len(y) / sr_out}


def fit_times(phones: list[str], ends: list[float], duration: float, rel_path: str) -> list[float]:
    """Make the last end time the wav duration (the diphone voices' OLA tail belongs to the final pause)."""
    gap = duration - ends[-1]
    if abs(gap) > 0.1 or (gap > 0.001 and phones[-1] != "pau") or (len(ends) > 1 and duration <= ends[-2]):
        raise RuntimeError(f"{rel_path}: festival's last segment ends at {ends[-1]:.4f}s but the wave lasts "
                           f"{duration:.4f}s; cannot align the two")
    return ends[:-1] + [duration]


# ------------------------------------------------------------------------------------------------- run
class _Progress:
    def __init__(self, total: int, enabled: bool):
        self.lock = threading.Lock()
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc="synthesize", unit="utt")

    def update(self) -> None:
        if self.bar is not None:
            with self.lock:
                self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def run_festival_worker(jobs: list[Job], work: Path, out_dir: Path, target_sr: int | None,
                        progress: _Progress, results: dict) -> None:
    """One festival process over ``jobs``; each utterance is post-processed when festival reports it."""
    work.mkdir(parents=True, exist_ok=True)
    script = work / "synth.scm"
    script.write_text(festival_script(jobs, work))
    by_id = {j.utt_id: j for j in jobs}
    stderr_tail: list[str] = []
    failed: list[Job] = []
    proc = subprocess.Popen(["festival", "-b", str(script)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, cwd=work)
    try:
        for line in proc.stderr:
            tag, _, uid = line.strip().partition(" ")
            if tag in ("DONE", "FAIL") and uid in by_id:
                job = by_id[uid]
                if tag == "FAIL":
                    failed.append(job)
                    continue
                try:
                    facts = finish_audio(job, work / f"{uid}.wav", out_dir, target_sr)
                    phones, ends = read_segs(work / f"{uid}.segs")
                    facts["phones"] = phones
                    facts["raw_last_end"] = ends[-1]
                    facts["ends"] = fit_times(phones, ends, facts["duration"], job.rel_path)
                except (RuntimeError, OSError, sf.LibsndfileError) as err:
                    proc.kill()
                    raise UserError(f"{err} (sentence line {job.sentence_line}: {job.text!r}, voice "
                                    f"{job.engine_voice}); fix or drop that sentence and rerun with --overwrite")
                results[uid] = facts
                (work / f"{uid}.wav").unlink()
                progress.update()
            else:
                stderr_tail = (stderr_tail + [line.rstrip()])[-5:]
    finally:
        rc = proc.wait()
    missing = [j for j in jobs if j.utt_id not in results]
    if missing:
        job = (failed or missing)[0]
        why = "; ".join(s for s in stderr_tail if s) or f"festival exited with status {rc}"
        raise UserError(f"festival could not synthesize {len(missing)} utterance(s), first {job.rel_path} "
                        f"(sentence line {job.sentence_line}: {job.text!r}, voice {job.engine_voice}): {why}; "
                        "fix or drop that sentence and rerun with --overwrite")


def run_espeak_job(job: Job, work: Path, out_dir: Path, target_sr: int, progress: _Progress,
                   results: dict) -> None:
    work.mkdir(parents=True, exist_ok=True)
    wav = work / f"{job.utt_id}.wav"
    wpm = max(80, min(450, round(ESPEAK_WPM / job.rate)))
    res = subprocess.run(["espeak-ng", "-v", job.engine_voice, "-s", str(wpm), "-w", str(wav), job.text],
                         capture_output=True, text=True, timeout=120)
    if res.returncode != 0 or not wav.is_file():
        raise UserError(f"espeak-ng failed on {job.rel_path} ({job.engine_voice}, line {job.sentence_line}: "
                        f"{job.text!r}): {res.stderr.strip() or res.returncode}")
    results[job.utt_id] = finish_audio(job, wav, out_dir, target_sr)
    wav.unlink()
    progress.update()


def _split(jobs: list[Job], parts: int) -> list[list[Job]]:
    """Deal voice-sorted jobs round-robin: every worker gets a similar mix of fast (diphone) and slow (HTS)
    voices and still switches voice only a few times (loading a voice costs a few ms)."""
    parts = max(1, min(parts, len(jobs)))
    return [jobs[k::parts] for k in range(parts)]


def synthesize_corpus(out_dir: str | os.PathLike, num_utts: int = 100, voices=DEFAULT_VOICES, seed: int = 0,
                      sample_rate: int | None = None, rates=DEFAULT_RATES, sentences: str | os.PathLike | None = None,
                      espeak_langs: Sequence[str] = (), espeak_utts: int = 0, overwrite: bool = False,
                      progress: bool = True, jobs: int | None = None) -> dict:
    """Synthesize the corpus into ``out_dir``; return the ``corpus_info.json`` dict.

    ``voices``: names (``kal``, ``ked``, ``slt``, or ``name=festival_voice_fn``) as a list or comma string.
    ``rates``: Duration_Stretch values to draw from, or a ``"lo:hi"`` string for uniform draws.
    ``sample_rate``: output rate for every file; ``None`` = the lowest native rate of the chosen festival voices
    (16000 for kal/ked; slt is natively 32000), never upsampling.
    """
    t0 = time.time()
    out_dir = Path(out_dir)
    if isinstance(num_utts, bool) or not isinstance(num_utts, int) or num_utts < 1:
        raise UserError(f"--num_utts must be a positive integer, got {num_utts!r}")
    if not isinstance(espeak_utts, int) or espeak_utts < 0:
        raise UserError(f"--espeak_utts must be >= 0, got {espeak_utts!r}")
    if sample_rate is not None and not (8000 <= int(sample_rate) <= 96000):
        raise UserError(f"--sample_rate {sample_rate} outside 8000..96000 Hz")
    if isinstance(espeak_langs, str):
        espeak_langs = [s for s in espeak_langs.split(",") if s.strip()]
    espeak_langs = [s.strip() for s in espeak_langs]
    if espeak_utts and not espeak_langs:
        raise UserError("--espeak_utts given without --espeak_langs (e.g. --espeak_langs fr-fr,de)")
    if espeak_langs and not espeak_utts:
        raise UserError("--espeak_langs given without --espeak_utts N (how many espeak-ng rows to add)")
    if len(set(espeak_langs)) != len(espeak_langs):
        raise UserError("--espeak_langs lists a language twice")
    voice_map = parse_voices(voices)
    rate_spec = parse_rates(rates)
    sent_path = Path(sentences) if sentences is not None else SENTENCE_DIR / "en.txt"
    sent = read_sentences(sent_path)
    esp_sent = {}
    for lang in espeak_langs:
        path = SENTENCE_DIR / f"{lang}.txt"
        if not path.is_file():
            shipped = sorted(p.stem for p in SENTENCE_DIR.glob("*.txt") if p.stem != "en")
            raise UserError(f"no sentence list for espeak language {lang!r} (shipped: {', '.join(shipped)}); "
                            f"add {path}")
        esp_sent[lang] = read_sentences(path, ascii_only=False)
    native = check_festival(voice_map)
    if espeak_langs:
        check_espeak(espeak_langs)
    target_sr = int(sample_rate) if sample_rate else min(native.values())
    prepare_out_dir(out_dir, overwrite)

    plan = plan_jobs(sent, voice_map, num_utts, seed, rate_spec, espeak_langs, espeak_utts, esp_sent)
    fest = sorted((j for j in plan if j.engine == "festival"), key=lambda j: (list(voice_map).index(j.voice),
                                                                            j.utt_id))
    esp = [j for j in plan if j.engine == "espeak"]
    workers = jobs or max(1, min(2, os.cpu_count() or 1))
    results: dict[str, dict] = {}
    import torch  # (slow first import: before the progress bar starts)

    bar = _Progress(len(plan), progress)
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(1)  # short 1-D convolutions: one thread each is fastest beside the festival processes
    try:
        with tempfile.TemporaryDirectory(prefix="synth_corpus_") as tmp, ThreadPoolExecutor(workers) as pool:
            futs = [pool.submit(run_festival_worker, chunk, Path(tmp) / f"w{k}", out_dir, target_sr, bar, results)
                    for k, chunk in enumerate(_split(fest, workers))]
            futs += [pool.submit(run_espeak_job, j, Path(tmp) / "espeak", out_dir, target_sr, bar, results)
                     for j in esp]
            for f in futs:
                f.result()
    finally:
        torch.set_num_threads(torch_threads)
        bar.close()

    with atomic_write(out_dir / "phones.tsv") as fh:
        for j in plan:
            if j.engine == "festival":
                r = results[j.utt_id]
                fh.write(f"{j.rel_path}\t{' '.join(r['phones'])}\t{' '.join(f'{t:.5f}' for t in r['ends'])}\n")
    with atomic_write(out_dir / "metadata.csv") as fh:
        for j in plan:
            fh.write(f"{j.rel_path}|{j.spk_id}|{j.language}|{j.text}\n")
    spk = {name: {"spk_id": i, "engine": "festival", "voice": fn, "language": "en-us",
                  "native_sample_rate": native[name], "num_utts": sum(j.voice == name for j in plan)}
           for i, (name, fn) in enumerate(voice_map.items())}
    for k, lang in enumerate(espeak_langs):
        folder = f"espeak-{lang}"
        spk[folder] = {"spk_id": len(voice_map) + k, "engine": "espeak-ng", "voice": lang, "language": lang,
                       "native_sample_rate": next((results[j.utt_id]["native_sr"] for j in esp if j.voice == folder),
                                                  None),
                       "num_utts": sum(j.voice == folder for j in plan)}
    info = {
        "generator": "data_prep/synth_corpus.py",
        "seed": seed,
        "sample_rate": target_sr,
        "rates": {"kind": rate_spec[0], "values": list(rate_spec[1]), "parameter": "Duration_Stretch"},
        "sentences": str(sent_path),
        "voices": spk,
        "counts": {"festival": len(fest), "espeak": len(esp), "total": len(plan),
                   "phones_tsv_lines": len(fest)},
        "total_duration_s": round(sum(r["duration"] for r in results.values()), 3),
        "elapsed_s": round(time.time() - t0, 2),
        "notes": "phones.tsv has festival utterances only (espeak-ng rows have no timings); its last end time "
                 "is the wav duration (the diphone voices' silent tail is part of the final pau).",
        "utterances": [
            {"rel_path": j.rel_path, "voice": j.voice, "spk_id": j.spk_id, "language": j.language,
             "rate": j.rate, "sentence_line": j.sentence_line, "num_samples": results[j.utt_id]["num_samples"],
             "duration_s": round(results[j.utt_id]["duration"], 6),
             **({"festival_last_end_s": results[j.utt_id]["raw_last_end"]} if j.engine == "festival" else {})}
            for j in plan
        ],
    }
    with atomic_write(out_dir / "corpus_info.json") as fh:
        json.dump(info, fh, indent=2)
        fh.write("\n")
    return info


def _positive_int(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {s!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"expected >= 0, got {v}")
    return v


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", help="output corpus folder (must be empty or new unless --overwrite)")
    p.add_argument("--num_utts", type=_positive_int, default=100, help="festival utterances in total (default 100)")
    p.add_argument("--voices", default=",".join(DEFAULT_VOICES),
                   help="comma list of kal,ked,slt (or name=festival_voice_fn); utterances go round-robin")
    p.add_argument("--seed", type=int, default=0, help="picks sentences and rates (default 0)")
    p.add_argument("--sentences", default=None, help="one sentence per line (default data_prep/sentences/en.txt)")
    p.add_argument("--sample_rate", type=_positive_int, default=None,
                   help="output sample rate, e.g. 22050 (default: the voices' lowest native rate, 16000)")
    p.add_argument("--rates", default=",".join(str(r) for r in DEFAULT_RATES),
                   help="Duration_Stretch values drawn per utterance (0.85,1.0,1.2) or a range lo:hi")
    p.add_argument("--espeak_langs", default="", help="add espeak-ng rows in these languages, e.g. fr-fr,de")
    p.add_argument("--espeak_utts", type=_positive_int, default=0, help="number of espeak-ng rows (no phones.tsv)")
    p.add_argument("--jobs", type=_positive_int, default=None, help="parallel festival processes (default 2)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing corpus in OUT")
    p.add_argument("--no_progress", action="store_true", help="no progress bar")
    return p


@cli
def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.jobs == 0:
        raise UserError("--jobs must be >= 1")
    info = synthesize_corpus(args.out, num_utts=args.num_utts, voices=args.voices, seed=args.seed,
                             sample_rate=args.sample_rate, rates=args.rates, sentences=args.sentences,
                             espeak_langs=[s for s in args.espeak_langs.split(",") if s.strip()],
                             espeak_utts=args.espeak_utts, overwrite=args.overwrite,
                             progress=not args.no_progress, jobs=args.jobs)
    c = info["counts"]
    print(f"wrote {c['total']} utterances ({c['festival']} festival, {c['espeak']} espeak-ng), "
          f"{info['total_duration_s'] / 60:.1f} min of audio at {info['sample_rate']} Hz to {args.out} "
          f"in {info['elapsed_s']:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
