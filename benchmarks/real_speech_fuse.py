#!/usr/bin/env python3
"""Offline study of the refinement members of one export (``align/export_durations.py --dump_members``): score
each member (first pass, frame classifier, HMM-GMM from the classifier's alignment, HMM-GMM from a flat start) and
weighted fusions of them against a reference, without re-running the export.

    python benchmarks/real_speech_fuse.py --alignments DIR/durations/alignments.jsonl --reference phones.tsv \
        [--languages aeb,...] [--fuse 'name=classifier:1,hmm_from_refined:1,hmm_flat_start:1' ...] [--breakdown]
        [--shift member=ms ...]

Every hypothesis goes through the same Matcha-frame rounding as the export (``boundaries_to_matcha``) and is
scored with ``score_tsv.py``'s pairing (benchmarks/real_speech.py).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import real_speech as R  # noqa: E402
from common.durations import boundaries_to_matcha, read_alignments  # noqa: E402

SIL_UNITS = {"<sil>", "pau", "sil", "sp"}


def hyp_line(rel: str, units: list[str], ends: np.ndarray, rec: dict) -> str:
    sr, hop = rec["sample_rate"], rec["hop_length"]
    T = int(sum(rec["durations"]))
    d = boundaries_to_matcha(np.maximum.accumulate(np.asarray(ends, dtype=np.float64)), T, sr, hop).numpy()
    b = np.cumsum(d) * hop / sr
    labs, es = [], []
    for u, e, n in zip(units, b, d):
        if n == 0:
            continue
        labs.append("pau" if u in SIL_UNITS else u)
        es.append(e)
    return f"{rel}\t{' '.join(labs)}\t{' '.join(f'{e:.6f}' for e in es)}\n"


def parse_weights(spec: str) -> tuple[str, dict[str, float]]:
    name, ws = spec.split("=", 1) if "=" in spec else (spec, spec)
    out = {}
    for kv in ws.split(","):
        k, v = kv.split(":") if ":" in kv else (kv, "1")
        out[k.strip()] = float(v)
    return name, out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--alignments", type=Path, required=True)
    ap.add_argument("--reference", type=Path, required=True)
    ap.add_argument("--languages", default=R.DEV_LANGUAGES)
    ap.add_argument("--fuse", nargs="*", default=[], help="name=member:weight,...; a name starting with median "
                    "takes the median of the members instead of their weighted mean")
    ap.add_argument("--shift", nargs="*", default=[], help="member=ms: move that member's inner boundaries")
    ap.add_argument("--breakdown", action="store_true")
    ap.add_argument("--score_tool", type=Path, default=R.SCORE_TOOL)
    ap.add_argument("--json_out", type=Path)
    a = ap.parse_args()
    langs = {x for x in a.languages.split(",") if x}
    tool = R.load_tool(a.score_tool)
    al = {r: v for r, v in read_alignments(a.alignments).items() if r.split("/")[0] in langs}
    shifts = {k: float(v) / 1000 for k, v in (s.split("=") for s in a.shift)}
    tmp = Path(tempfile.mkdtemp(prefix="fuse_"))
    ref = tmp / "ref.tsv"
    R.write_filtered(R.read_lines(a.reference), langs, ref)
    members = sorted({k for r in al.values() for k in r.get("member_ends_s", {})})
    hyps = {m: {m: 1.0} for m in members}
    hyps["final (as exported)"] = None
    for spec in a.fuse:
        n, w = parse_weights(spec)
        hyps[n] = w
    rows = {}
    for name, w in hyps.items():
        lines = []
        for rel, r in sorted(al.items()):
            units = r["aligned_tokens"]
            if w is None:
                ends = np.asarray(r["aligned_ends_s"])
            else:
                me = r.get("member_ends_s", {})
                have = [(wt, np.asarray(me[k]) + np.r_[np.full(len(me[k]) - 1, shifts.get(k, 0.0)), 0.0])
                        for k, wt in w.items() if k in me and wt]
                if not have:
                    continue
                ends = (np.median(np.stack([e for _, e in have]), 0) if name.startswith("median") else
                        sum(wt * e for wt, e in have) / sum(wt for wt, _ in have))
            lines.append(hyp_line(rel, units, ends, r))
        hyp = tmp / f"hyp_{len(rows)}.tsv"
        hyp.write_text("".join(lines), encoding="utf-8")
        rows[name] = R.score(a.score_tool, tool, ref, hyp, tmp / f"s_{len(rows)}.json")
    print(R.table(rows))
    if a.breakdown:
        for name, r in rows.items():
            print(f"\n== {name}\n{R.breakdown(r['errors'])}")
    if a.json_out:
        a.json_out.write_text(json.dumps({k: {kk: vv for kk, vv in v.items() if kk != "errors"}
                                          for k, v in rows.items()}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
