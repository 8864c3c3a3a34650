#!/usr/bin/env python3
"""Phone boundaries on real human speech: the user's path end to end on a corpus with hand-corrected phone times
(e.g. VoxAngeles prepared in Matcha's layout), scored against those times.

    python benchmarks/real_speech.py --corpus DIR [--work DIR] [--languages aeb,aka,...] [--epochs 10]
        [--export_variants 'no_refine=--no_refine' 'hmm0=--hmm_weight 0' ...]

DIR holds ``metadata.csv`` (``rel_path|spk_id|language|text``), ``wavs/{rel_path}.wav``, ``phones.tsv`` (the
human-corrected phones and END times, ``pau`` = silence) and optionally ``phones_mfa.tsv`` (another aligner's
output in the same format, scored as its own row).

1. the user's transcript: ``phones.tsv``'s phone sequence without its ``pau`` labels (``WORK/phones_nopau.tsv``);
2. stages 0-1 of ``recipes/pipeline.py``: ``make_manifests.py --format matcha --phones_tsv ... --split_by
   utterance`` and ``recipes/train.py hparams/phoneme.yaml --number_of_epochs N`` (skipped when
   ``WORK/model/metrics.json`` exists, so export experiments reuse the model);
3. ``align/export_durations.py`` on every row: the defaults, then each ``--export_variants`` entry
   (``name=flags``), each into its own corpus folder ``WORK/exports/NAME/corpus`` (metadata + a link to the wavs)
   so every export stays inspectable; an export whose flags equal those of its existing ``alignments.jsonl`` is
   reused (``--force`` re-exports);
4. ``alignments.jsonl`` durations (Matcha frames) -> a phones.tsv-like hypothesis (``common.boundary_eval.
   hyp_segments``: blanks and empty gaps -> ``pau`` segments), scored with ``score_tsv.py`` against ``phones.tsv``,
   both filtered to ``--languages`` (rel_path prefix; every row is trained on and exported, only the scores are
   filtered). The official figures come from the tool's JSON; the signed errors by boundary type and the
   per-language table are recomputed with the tool's own pairing (imported).

Prints one table (rows: the default, each variant, ``phones_mfa.tsv``; columns: all mean / median / <=20 ms,
phone|phone mean / <=20 ms, speech/silence edges mean / <=20 ms, signed bias all / phone|phone / edges) and a
per-language table (mean |error| all / phone|phone), and writes ``WORK/real_speech.json``. ``--breakdown``
also prints the signed error by boundary direction and by the phone classes on either side.
5. corpus cleaning (``--swap N``, default 6): N transcripts swapped in pairs between words of one scored language,
   exported with the default flags, and the review flags of ``export_report.json`` counted (those N and the
   others).
"""
from __future__ import annotations

import argparse
import collections
import importlib.util
import json
import shlex
import os
import statistics
import subprocess
import sys
import time
import unicodedata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common.boundary_eval import hyp_segments  # noqa: E402
from common.pipeline import Pipeline  # noqa: E402
from common.durations import read_alignments  # noqa: E402

DEV_LANGUAGES = ("aeb,aka,ben,bfd,bsq,bwr,cha,col,cpn,dag,dyo,ell,eus,ewe,ffm,fub,gaa,gla,hak,hil,its,kub,lad,led,"
                 "njm,ozm,run,wuu")
SCORE_TOOL = ROOT.parent / "shared" / "tools" / "score_tsv.py"  # the scoring tool beside the checkout
SIL_LABELS = {"pau", "sil", "sp", "SIL", "<sil>"}


def sh(*cmd, env=None) -> None:
    print("+", " ".join(map(str, cmd)), flush=True)
    subprocess.run([str(c) for c in cmd], check=True, cwd=ROOT, env=env)


def threads_env(n: int) -> dict:
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(n))
    env.setdefault("MKL_NUM_THREADS", str(n))
    return env


def load_tool(path: Path):
    spec = importlib.util.spec_from_file_location("score_tsv", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def read_lines(path: Path) -> dict[str, str]:
    return {ln.split("\t", 1)[0]: ln for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()}


def write_filtered(lines: dict[str, str], langs: set[str], out: Path) -> int:
    keep = [ln for rel, ln in sorted(lines.items()) if rel.split("/")[0] in langs]
    out.write_text("".join(ln + "\n" for ln in keep), encoding="utf-8")
    return len(keep)


def strip_pau(phones_tsv: Path, out: Path) -> None:
    """The transcript a user has: the phone sequence without silence labels (end times kept for the format)."""
    rows = []
    for ln in phones_tsv.read_text(encoding="utf-8").splitlines():
        if not ln.strip():
            continue
        rel, ph, ends = ln.split("\t")
        kept = [(p, e) for p, e in zip(ph.split(), ends.split()) if p not in SIL_LABELS]
        rows.append(f"{rel}\t{' '.join(p for p, _ in kept)}\t{' '.join(e for _, e in kept)}\n")
    out.write_text("".join(rows), encoding="utf-8")


def alignments_to_tsv(align_file: Path, out: Path) -> int:
    """alignments.jsonl (Matcha sequence + frame counts) -> ``rel_path<TAB>labels<TAB>end times``."""
    al = read_alignments(align_file)
    with open(out, "w", encoding="utf-8") as fh:
        for rel in sorted(al):
            r = al[rel]
            segs = [s for s in hyp_segments(r["tokens"], r["durations"], r["sample_rate"], r["hop_length"],
                                            merge_modifiers=False) if s.end > s.start]
            fh.write(f"{rel}\t{' '.join(s.label for s in segs)}\t{' '.join(f'{s.end:.6f}' for s in segs)}\n")
    return len(al)


# ---------------------------------------------------------------- phone classes (broad, from the IPA base letter)
VOWELS = set("aeiouyæøɑɒɔəɛɤɨɪɯʉʊʌʏɐɜɞɵɘœɶɚɝ")
STOPS = set("pbtdkgɡqcɟʔɖʈɓɗʄɠʛ")
NASALS = set("mnŋɲɳɱɴ")
FRICATIVES = set("fvszʃʒxɣhɦçðθħʕχʁɸβɕʑʂʐɬɮʍʝ")
APPROX = set("lrɾɹɻɽjwɥʋʎɭʀʟɺ")


def base_letters(label: str) -> list[str]:
    return [c for c in unicodedata.normalize("NFD", label) if unicodedata.category(c).startswith("L")
            and c not in "ːˑʰʱʲʷˠˤ˞ʼⁿˢ"]


def phone_class(label: str) -> str:
    if label == "pau":
        return "sil"
    b = base_letters(label)
    if not b:
        return "other"
    c = b[0]
    if "\u0361" in label and len(b) > 1 and b[1] in FRICATIVES | {"s", "z", "ʃ", "ʒ", "ɬ", "f"} and c in STOPS:
        return "affricate"
    if c in VOWELS:
        return "vowel"
    for name, s in (("stop", STOPS), ("nasal", NASALS), ("fricative", FRICATIVES), ("approximant", APPROX)):
        if c in s:
            return name
    return "other"


# ---------------------------------------------------------------- scoring
def boundary_errors(tool, ref_tsv: Path, hyp_tsv: Path) -> list[tuple[str, float, str, str]]:
    """Every scored boundary as (rel_path, signed error s, left ref label, right ref label), with the tool's own
    normalisation, pairing and edge rule (score_tsv.score_utt, re-run here to keep the labels)."""
    sil = set(SIL_LABELS)
    ref, hyp = tool.read_tsv(str(ref_tsv), sil), tool.read_tsv(str(hyp_tsv), sil)
    out = []
    for rel in sorted(ref.keys() & hyp.keys()):
        (rl, re_), (hl, he) = ref[rel], hyp[rel]
        r_end, h_end = re_[-1], he[-1]
        pairs = tool.align(rl, hl, False)
        for (i, j), (i2, j2) in zip(pairs, pairs[1:]):
            if i2 != i + 1 or j2 != j + 1:
                continue
            tr, th = re_[i], he[j]
            if (tr <= tool.EDGE or tr >= r_end - tool.EDGE) and (th <= tool.EDGE or th >= h_end - tool.EDGE):
                continue
            out.append((rel, th - tr, rl[i], rl[i + 1]))
    return out


def kind_of(left: str, right: str) -> str:
    if left == "pau":
        return "sil->speech"
    if right == "pau":
        return "speech->sil"
    return "phone|phone"


def summarize(errs: list[float]) -> dict:
    if not errs:
        return {"n": 0, "mean_ms": None, "median_ms": None, "within_20ms_pct": None, "signed_ms": None}
    a = [abs(e) * 1000 for e in errs]
    return {"n": len(a), "mean_ms": round(statistics.fmean(a), 2), "median_ms": round(statistics.median(a), 2),
            "within_20ms_pct": round(100 * sum(x <= 20 + 1e-6 for x in a) / len(a), 2),
            "signed_ms": round(statistics.fmean(errs) * 1000, 2)}


def score(tool_path: Path, tool, ref_tsv: Path, hyp_tsv: Path, json_out: Path) -> dict:
    """The tool's report (run as the CLI) + our signed breakdown from the same pairing."""
    res = subprocess.run([sys.executable, str(tool_path), str(ref_tsv), str(hyp_tsv), "--json_out", str(json_out)],
                         check=True, capture_output=True, text=True)
    official = json.loads(json_out.read_text())
    official["last_line"] = json.loads(res.stdout.strip().splitlines()[-1])
    errs = boundary_errors(tool, ref_tsv, hyp_tsv)
    by_kind = collections.defaultdict(list)
    by_lang = collections.defaultdict(lambda: collections.defaultdict(list))
    for rel, e, lft, rgt in errs:
        k = kind_of(lft, rgt)
        by_kind[k].append(e)
        by_kind["edges"].append(e) if k != "phone|phone" else None
        lang = rel.split("/")[0]
        by_lang[lang]["all"].append(e)
        by_lang[lang][k if k == "phone|phone" else "edges"].append(e)
    ours = summarize([e for _, e, _, _ in errs])
    if ours["n"] != official["overall"]["boundaries"] or abs(ours["mean_ms"] - official["overall"]["mean_ms"]) > 0.02:
        raise SystemExit(f"internal pairing disagrees with {tool_path}: {ours} vs {official['overall']}")
    return {"official": official, "all": ours, "by_kind": {k: summarize(v) for k, v in sorted(by_kind.items())},
            "by_language": {lg: {k: summarize(v) for k, v in d.items()} for lg, d in sorted(by_lang.items())},
            "errors": errs}


def breakdown(errs, min_n: int = 30) -> str:
    """Signed error by direction, by class pair and by the worst/most common phone pairs."""
    lines = []

    def block(title, key):
        g = collections.defaultdict(list)
        for rel, e, lft, rgt in errs:
            g[key(lft, rgt)].append(e)
        lines.append(f"{title:<34}{'n':>6}{'mean|e|':>9}{'signed':>9}{'median':>9}{'<=20':>7}{'p10':>8}{'p90':>8}")
        for k, v in sorted(g.items(), key=lambda kv: -len(kv[1])):
            if len(v) < min_n:
                continue
            s = summarize(v)
            srt = sorted(x * 1000 for x in v)
            p10, p90 = srt[len(srt) // 10], srt[(9 * len(srt)) // 10]
            med = statistics.median(srt)
            lines.append(f"  {k:<32}{s['n']:>6}{s['mean_ms']:>9.1f}{s['signed_ms']:>+9.1f}{med:>+9.1f}"
                         f"{s['within_20ms_pct']:>7.1f}{p10:>+8.1f}{p90:>+8.1f}")

    block("direction", kind_of)
    block("class pair (left|right)", lambda a, b: f"{phone_class(a)}|{phone_class(b)}")
    return "\n".join(lines)


def fmt(x, spec=".1f", width=7) -> str:
    return f"{x:{spec[0] if spec[0] in '+-' else ''}{width}{spec.lstrip('+-')}}" if x is not None else f"{'-':>{width}}"


def table(rows: dict[str, dict]) -> str:
    head = (f"{'':<26}{'n':>6}{'all':>7}{'med':>7}{'<=20':>7} | {'p|p':>6}{'<=20':>7} | {'edges':>6}{'<=20':>7} |"
            f"{'bias':>7}{'p|p':>7}{'edges':>7}")
    out = [head, "-" * len(head)]
    for name, r in rows.items():
        o = r["official"]
        pp, ed = o["by_kind"].get("phone|phone", {}), o["by_kind"].get("speech/silence edge", {})
        out.append(f"{name:<26}{o['overall']['boundaries']:>6}{fmt(o['overall']['mean_ms'])}"
                   f"{fmt(o['overall']['median_ms'])}{fmt(o['overall']['within_20ms_pct'])} | "
                   f"{fmt(pp.get('mean_ms'), width=6)}{fmt(pp.get('within_20ms_pct'))} | "
                   f"{fmt(ed.get('mean_ms'), width=6)}{fmt(ed.get('within_20ms_pct'))} |"
                   f"{fmt(o['signed_mean_ms'], '+.1f')}"
                   f"{fmt(r['by_kind'].get('phone|phone', {}).get('signed_ms'), '+.1f')}"
                   f"{fmt(r['by_kind'].get('edges', {}).get('signed_ms'), '+.1f')}")
    out.append("ms; all = every scored boundary, p|p = between two phones, edges = speech/silence; bias = signed "
               "mean (hyp - ref)")
    return "\n".join(out)


def language_table(rows: dict[str, dict]) -> str:
    names = list(rows)
    langs = sorted(set().union(*(r["by_language"] for r in rows.values())))
    head = f"{'language':<10}" + "".join(f"{n[:16]:>18}" for n in names)
    sub = f"{'':<10}" + "".join(f"{'all':>9}{'p|p':>9}" for _ in names)
    out = [head, sub, "-" * len(head)]
    for lg in langs:
        cells = []
        for n in names:
            d = rows[n]["by_language"].get(lg, {})
            cells.append(fmt(d.get("all", {}).get("mean_ms"), width=9) + fmt(d.get("phone|phone", {}).get("mean_ms"),
                                                                            width=9))
        out.append(f"{lg:<10}" + "".join(cells))
    return "\n".join(out)


def prepare_export_corpus(src: Path, dst: Path) -> None:
    """A corpus folder for one export: the metadata and a link to the wavs (durations/ stays per export)."""
    dst.mkdir(parents=True, exist_ok=True)
    meta = dst / "metadata.csv"
    if not meta.is_file() or meta.read_bytes() != (src / "metadata.csv").read_bytes():
        meta.write_bytes((src / "metadata.csv").read_bytes())
    wavs = dst / "wavs"
    if not wavs.exists():
        wavs.symlink_to((src / "wavs").resolve(), target_is_directory=True)


def swap_check(a, w: Path, corpus: Path, model: Path, nopau: Path, langs: set[str], env: dict) -> dict:
    """Swap ``a.swap`` transcripts in pairs between words of one scored language, export with the default flags
    (the same model), and count which rows ``export_report.json`` flags for review."""
    import random

    lines = [ln.split("\t") for ln in nopau.read_text(encoding="utf-8").splitlines() if ln.strip()]
    by_lang = collections.defaultdict(list)
    for k, (rel, _, _) in enumerate(lines):
        if rel.split("/")[0] in langs:
            by_lang[rel.split("/")[0]].append(k)
    rng = random.Random(a.seed)
    swapped = []
    for lang in rng.sample(sorted(g for g, v in by_lang.items() if len(v) >= 2), max(1, a.swap // 2)):
        i, j = rng.sample(by_lang[lang], 2)
        lines[i][1:], lines[j][1:] = lines[j][1:], lines[i][1:]
        swapped += [lines[i][0], lines[j][0]]
    d = w / "exports" / "swap"
    prepare_export_corpus(corpus, d / "corpus")
    tsv = d / "phones_swapped.tsv"
    tsv.write_text("".join("\t".join(x) + "\n" for x in lines), encoding="utf-8")
    sh(sys.executable, "align/export_durations.py", "--corpus", d / "corpus", "--model_dir", model, "--device", "cpu",
       "--no_mels", "--overwrite", "--no_progress", "--phones_tsv", tsv, env=env)
    rep = json.loads((d / "corpus" / "durations" / "export_report.json").read_text())
    flagged = set(rep["flagged"])
    return {"swapped": len(swapped), "rows": len(lines), "swapped_rows": swapped,
            "swapped_and_flagged": len(flagged & set(swapped)), "other_rows_flagged": len(flagged - set(swapped)),
            "flag_rules": rep["flag_rules"],
            "swapped_statistics": {r: rep["utterances"][r] for r in swapped}}


def parse_variant(spec: str) -> tuple[str, list[str]]:
    if "=" in spec:
        name, flags = spec.split("=", 1)
    else:
        name, flags = spec.strip("- ").replace(" ", "_").replace("--", ""), spec
    return name.strip(), shlex.split(flags)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", type=Path, required=True)
    ap.add_argument("--work", type=Path, default=Path("/tmp/real_speech"))
    ap.add_argument("--languages", default=DEV_LANGUAGES, help="comma-separated rel_path prefixes to SCORE "
                    "(default: the 28 development languages of VoxAngeles); training and export use every row")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--train_args", default="", help="extra recipes/train.py arguments (a new --work for each)")
    ap.add_argument("--export_variants", nargs="*", default=[], metavar="NAME=FLAGS",
                    help="extra exports with the same model, e.g. 'no_refine=--no_refine' 'hmm0=--hmm_weight 0'")
    ap.add_argument("--no_default", action="store_true", help="skip the default export row")
    ap.add_argument("--force", action="store_true", help="re-export even when flags match an existing export")
    ap.add_argument("--breakdown", action="store_true", help="signed error by direction and phone classes")
    ap.add_argument("--score_tool", type=Path, default=SCORE_TOOL)
    ap.add_argument("--num_threads", type=int, default=2)
    ap.add_argument("--swap", type=int, default=6, help="corpus-cleaning check: swap this many transcripts (in pairs, "
                    "between words of one scored language), export with the default flags and count what is flagged "
                    "(0 = skip)")
    ap.add_argument("--seed", type=int, default=6, help="seed of the swapped pairs")
    a = ap.parse_args()
    t_start = time.time()
    w, corpus = a.work, a.corpus.resolve()
    w.mkdir(parents=True, exist_ok=True)
    langs = {x.strip() for x in a.languages.split(",") if x.strip()}
    tool = load_tool(a.score_tool)
    env = threads_env(a.num_threads)
    timing = {}

    # 1-2. transcript without silences, manifests, training (reused when done)
    nopau = w / "phones_nopau.tsv"
    if not nopau.is_file():
        strip_pau(corpus / "phones.tsv", nopau)
    pipe = Pipeline(corpus, w, prep=["--format", "matcha", "--phones_tsv", str(nopau), "--split_by", "utterance",
                                     "--no_progress"],
                    train=["--number_of_epochs", str(a.epochs), "--num_threads", str(a.num_threads),
                           "--noprogressbar", *a.train_args.split()])
    timing.update(pipe.run(0, 1))
    model = pipe.model
    metrics = json.loads((model / "metrics.json").read_text())

    # reference, filtered to the scored languages
    ref_lines = read_lines(corpus / "phones.tsv")
    ref_dev = w / "ref_scored.tsv"
    n_ref = write_filtered(ref_lines, langs, ref_dev)
    print(f"scoring {n_ref} rows of {len(ref_lines)} ({len(langs)} languages)")

    # 3-4. exports and scores
    variants = ([] if a.no_default else [("default", [])]) + [parse_variant(v) for v in a.export_variants]
    rows: dict[str, dict] = {}
    for name, flags in variants:
        d = w / "exports" / name
        cdir = d / "corpus"
        prepare_export_corpus(corpus, cdir)
        align_file, flag_file = cdir / "durations" / "alignments.jsonl", d / "flags.json"
        same = flag_file.is_file() and json.loads(flag_file.read_text()) == flags and align_file.is_file()
        if a.force or not same:
            t = time.time()
            flag_file.unlink(missing_ok=True)
            sh(sys.executable, "align/export_durations.py", "--corpus", cdir, "--model_dir", model, "--device", "cpu",
               "--no_mels", "--overwrite", "--no_progress", *flags, env=env)
            timing[f"export {name}"] = round(time.time() - t, 1)
            flag_file.write_text(json.dumps(flags))
        hyp_all, hyp_dev = d / "hyp_all.tsv", d / "hyp_scored.tsv"
        alignments_to_tsv(align_file, hyp_all)
        write_filtered(read_lines(hyp_all), langs, hyp_dev)
        rows[name] = score(a.score_tool, tool, ref_dev, hyp_dev, d / "score.json")
    mfa = corpus / "phones_mfa.tsv"
    if mfa.is_file():
        mfa_dev = w / "mfa_scored.tsv"
        write_filtered(read_lines(mfa), langs, mfa_dev)
        rows["raw MFA (phones_mfa.tsv)"] = score(a.score_tool, tool, ref_dev, mfa_dev, w / "score_mfa.json")

    cleaning = swap_check(a, w, corpus, model, nopau, langs, env) if a.swap else None
    print()
    print(table(rows))
    print()
    first = next(iter(rows))  # the default (or the first variant) beside raw MFA
    print(language_table({k: v for k, v in rows.items() if k in (first, "raw MFA (phones_mfa.tsv)")}))
    if a.breakdown:
        for name, r in rows.items():
            print(f"\n== {name}: signed error (ms) by boundary type\n{breakdown(r['errors'])}")
    if cleaning:
        print(f"\ncorpus cleaning: {cleaning['swapped_and_flagged']} of {cleaning['swapped']} swapped transcripts "
              f"flagged, {cleaning['other_rows_flagged']} other rows of {cleaning['rows']} flagged")
    out = {"corpus": str(corpus), "languages": sorted(langs), "scored_rows": n_ref, "epochs": a.epochs,
           "cleaning": cleaning,
           "model": {k: metrics.get(k) for k in ("test_PER", "test_PER_beam", "valid_PER") if k in metrics},
           "rows": {k: {kk: vv for kk, vv in v.items() if kk != "errors"} for k, v in rows.items()},
           "variants": {n: f for n, f in variants}, "timing_sec": {**timing, "total": round(time.time() - t_start, 1)}}
    (w / "real_speech.json").write_text(json.dumps(out, indent=1, ensure_ascii=False))
    print(f"\nwrote {w / 'real_speech.json'} ({time.time() - t_start:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
