#!/usr/bin/env python3
"""Phone-boundary accuracy of exported durations or TextGrids against a reference ``phones.tsv``.

    python align/evaluate.py --reference OUT/phones.tsv --durations OUT/durations [--out report.json] [--plot h.png]
    python align/evaluate.py --reference OUT/phones.tsv --textgrids DIR

``--durations DIR`` reads ``DIR/alignments.jsonl`` (format: ``common/durations.py``) and, when present, checks each
record against its duration file ``DIR/{rel_path}.pt`` / ``.npy``. ``--sample_rate`` / ``--hop_length`` fill in
records that lack them and must agree with records that have them. ``--textgrids DIR`` scores the ``phones`` tier
of ``DIR/{rel_path}.TextGrid``. Speaking rates come from ``corpus_info.json`` beside ``phones.tsv`` when present.
Scoring rules: ``common/boundary_eval.py``. Prints a table; ``--out`` writes the JSON report, ``--plot`` a histogram.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.boundary_eval import (Segment, evaluate, format_table, hyp_segments,  # noqa: E402
                               plot_histogram, read_rates)
from common.corpus import read_phones_tsv  # noqa: E402
from common.durations import read_alignments, read_durations  # noqa: E402
from common.io import UserError, cli, write_json  # noqa: E402
from common.textgrid import read_textgrid_folder  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reference", required=True, type=Path, help="phones.tsv: rel_path<TAB>phones<TAB>end times")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--durations", type=Path, help="folder with alignments.jsonl (+ {rel_path}.pt/.npy)")
    src.add_argument("--textgrids", type=Path, help="folder with {rel_path}.TextGrid (tier 'phones')")
    p.add_argument("--sample_rate", type=int, help="sample rate of the durations (default: from each record)")
    p.add_argument("--hop_length", type=int, help="Matcha hop length (default: from each record)")
    p.add_argument("--out", type=Path, help="write the JSON report here")
    p.add_argument("--plot", type=Path, help="write an error histogram (PNG) here")
    p.add_argument("--worst", type=int, default=10, help="how many worst utterances to list")
    return p.parse_args(argv)


def _setting(rec: dict, key: str, cli_value: int | None, where: str) -> int:
    val = rec.get(key)
    if val is None and cli_value is None:
        raise UserError(f"{where}: record has no {key}; give --{key}")
    if val is not None and cli_value is not None and int(val) != cli_value:
        raise UserError(f"{where}: record says {key}={val} but --{key} {cli_value}; drop the option or fix the export")
    return int(val if val is not None else cli_value)


def _duration_file(folder: Path, rel: str) -> Path | None:
    for cand in (folder / f"{rel}.pt", folder / f"{rel}.npy", folder / f"{Path(rel).name}.npy"):
        if cand.is_file():
            return cand
    return None


def load_duration_hyps(folder: Path, sample_rate: int | None, hop_length: int | None) -> dict[str, list[Segment]]:
    if not folder.is_dir():
        raise UserError(f"{folder}: durations folder not found; run align/export_durations.py first")
    records = read_alignments(folder / "alignments.jsonl")
    hyps = {}
    for rel, rec in records.items():
        where = f"{folder / 'alignments.jsonl'} ({rel})"
        sr = _setting(rec, "sample_rate", sample_rate, where)
        hop = _setting(rec, "hop_length", hop_length, where)
        durs = rec["durations"]
        dur_file = _duration_file(folder, rel)
        if dur_file is not None:
            on_disk = read_durations(dur_file).tolist()
            if on_disk != durs:
                raise UserError(f"{dur_file}: {len(on_disk)} durations (sum {sum(on_disk)}) differ from its "
                                f"alignments.jsonl record ({len(durs)}, sum {sum(durs)}); re-run the export")
        hyps[rel] = hyp_segments(rec["tokens"], durs, sr, hop)
    return hyps


@cli
def main(argv=None) -> int:
    args = parse_args(argv)
    if not args.reference.is_file():
        raise UserError(f"{args.reference}: reference phones.tsv not found")
    reference = read_phones_tsv(args.reference)
    if args.durations is not None:
        hyps = load_duration_hyps(args.durations, args.sample_rate, args.hop_length)
    else:
        hyps = read_textgrid_folder(args.textgrids)
    rates = read_rates(args.reference.parent / "corpus_info.json")
    report, errors = evaluate(reference, hyps, rates, worst_n=args.worst)
    report["reference"] = str(args.reference)
    report["hypothesis"] = str(args.durations or args.textgrids)
    print(format_table(report))
    if args.out:
        write_json(args.out, report)
        print(f"report: {args.out}")
    if args.plot:
        plot_histogram(errors, args.plot)
        print(f"histogram: {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
