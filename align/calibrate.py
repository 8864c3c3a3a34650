#!/usr/bin/env python3
"""Learn the boundary convention of a few hand-checked utterances; the export then applies it to every row.

    python align/calibrate.py --durations CORPUS/durations --textgrids CHECKED/ --out calibration.json
    python align/calibrate.py --durations CORPUS/durations --reference phones.tsv --out calibration.json
    python align/export_durations.py --corpus CORPUS ... --overwrite --calibration calibration.json

1. export as usual (``--textgrid`` writes ``CORPUS/textgrids/{rel_path}.TextGrid``);
2. correct a few dozen of those TextGrids by hand (Praat), or give reference phone times (``phones.tsv``:
   ``rel_path<TAB>phones<TAB>end times``); only the rows they cover are used;
3. this script pairs every reference boundary with the exported one (as ``align/evaluate.py`` does) and estimates
   the mean offset per boundary type, per speaker (``common/calibration.py``);
4. export again with ``--calibration FILE`` and the same other settings.

It prints the labelled rows' mean |boundary error| before and after calibration, the offsets of each row estimated
from the other rows only (``--folds``-fold cross-validation): what calibration gains on rows nobody labelled.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.calibration import boundary_samples, cross_validate, fit, load_reference  # noqa: E402
from common.durations import read_alignments  # noqa: E402
from common.io import UserError, cli  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--durations", required=True, type=Path,
                   help="the export's folder (CORPUS/durations: alignments.jsonl), exported without --calibration")
    ref = p.add_mutually_exclusive_group(required=True)
    ref.add_argument("--reference", type=Path, help="phones.tsv with reference phone end times")
    ref.add_argument("--textgrids", type=Path, help="folder of hand-checked {rel_path}.TextGrid (tier 'phones')")
    p.add_argument("--out", required=True, type=Path, help="calibration file to write (JSON)")
    p.add_argument("--shrink", type=float, default=1.0,
                   help="pseudo-observations pulling each offset towards its parent's (default 1; more = safer "
                        "with very few labelled rows)")
    p.add_argument("--folds", type=int, default=5, help="cross-validation folds for the printed estimate")
    a = p.parse_args(argv)
    if a.shrink < 0:
        p.error("--shrink must be >= 0")
    if a.folds < 2:
        p.error("--folds must be >= 2")
    return a


@cli
def main(argv=None) -> int:
    a = parse_args(argv)
    records = read_alignments(a.durations / "alignments.jsonl")
    report_file = a.durations / "export_report.json"
    export_info = {}
    if report_file.is_file():
        rep = json.loads(report_file.read_text(encoding="utf-8"))
        if rep.get("calibration"):
            raise UserError(f"{report_file}: this export was already calibrated ({rep['calibration']['file']}); "
                            f"export again without --calibration and fit on that")
        export_info = {k: rep.get(k) for k in ("model_dir", "scores", "add_blank", "hop_length")}
        export_info["refined"] = rep.get("refine") is not None
    refs = load_reference(a.reference or a.textgrids)
    used = sorted(set(refs) & set(records))
    if not used:
        raise UserError(f"none of the {len(refs)} reference rows is in {a.durations / 'alignments.jsonl'}; their "
                        f"names must be the export's rel_path (e.g. {next(iter(records), 'voice/utt')})")
    samples, utt_of = [], []
    for rel in used:
        rec = records[rel]
        if "aligned_tokens" not in rec or "aligned_ends_s" not in rec:
            raise UserError(f"{a.durations / 'alignments.jsonl'} ({rel}): no aligned_tokens/aligned_ends_s; "
                            f"re-run align/export_durations.py")
        s = boundary_samples(str(rec.get("speaker", "")), rec["aligned_tokens"], rec["aligned_ends_s"], refs[rel])
        samples += s
        utt_of += [rel] * len(s)
    cv = cross_validate(samples, utt_of, a.shrink, a.folds)
    cal = fit(samples, a.shrink, info={"utterances": len(used), "boundaries": len(samples),
                                       "reference": str(a.reference or a.textgrids),
                                       "durations": str(a.durations), "export": export_info,
                                       "cross_validated": cv})
    cal.save(a.out)
    speakers = sorted({s[0] for s in samples})
    print(f"calibration: {len(used)} labelled row(s) ({len(refs) - len(used)} reference row(s) not in the export), "
          f"{len(samples)} boundaries, {len(speakers)} speaker(s); mean offset "
          f"{cal.tables['all'][()][0] * 1000:+.1f} ms; {len(cal.tables['speaker_pair'])} boundary types")
    if cv:
        b, f = cv["before"], cv["after"]
        print(f"labelled rows, {cv['folds']}-fold cross-validated: mean |error| {b['mean_ms']:.2f} -> "
              f"{f['mean_ms']:.2f} ms, within 20 ms {b['within_20ms']:.1f} -> {f['within_20ms']:.1f} %")
    else:
        print(f"(fewer than {a.folds} labelled rows: no cross-validated estimate)")
    print(f"wrote {a.out}; apply it with align/export_durations.py ... --overwrite --calibration {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
