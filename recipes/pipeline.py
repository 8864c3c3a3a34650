#!/usr/bin/env python3
"""Corpus -> manifests -> trained recognizer -> PER -> Matcha durations (-> boundary scores), stage by stage.

    python recipes/pipeline.py --corpus DIR --work DIR [--stage 0] [--stop_stage 4] [--force]
        [--prep "ARGS"] [--train "ARGS"] [--decode "ARGS"] [--export "ARGS"] [--reference phones.tsv]

Stages (common/pipeline.py): 0 manifests (WORK/manifests), 1 train (WORK/model), 2 decode (PER of the test split),
3 export (DIR/durations), 4 evaluate (WORK/boundary_report.json; needs --reference). A stage whose output exists is
skipped unless --force. The quoted ARGS go to that stage's own command line, e.g.
``--train "--number_of_epochs 10"`` or ``--export "--textgrid --device cpu"``.
"""
from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from common.io import UserError, cli  # noqa: E402
from common.pipeline import STAGES, Pipeline  # noqa: E402


@cli
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", required=True, type=Path, help="the corpus (Matcha layout for the export)")
    p.add_argument("--work", required=True, type=Path, help="where manifests/, model/ and reports go")
    p.add_argument("--stage", type=int, default=0,
                   help=f"first stage ({', '.join(f'{i} {s}' for i, s in enumerate(STAGES))})")
    p.add_argument("--stop_stage", type=int, default=len(STAGES) - 1, help="last stage")
    p.add_argument("--force", action="store_true", help="run the stages even when their output exists")
    for s in ("prep", "train", "decode", "export"):
        p.add_argument(f"--{s}", default="", metavar="ARGS", help=f"extra arguments of the {s} stage (one string)")
    p.add_argument("--hparams", type=Path, default=ROOT / "hparams" / "phoneme.yaml", help="training yaml")
    p.add_argument("--reference", type=Path, help="phones.tsv with reference phone times (stage 4)")
    a = p.parse_args(argv)
    if a.reference is not None and not a.reference.is_file():
        raise UserError(f"{a.reference}: reference phones.tsv not found")
    pipe = Pipeline(a.corpus, a.work, shlex.split(a.prep), shlex.split(a.train), shlex.split(a.decode),
                    shlex.split(a.export), a.reference, a.hparams)
    times = pipe.run(a.stage, a.stop_stage, a.force)
    print("[pipeline] done: " + (", ".join(f"{k} {v:.0f} s" for k, v in times.items()) or "nothing to do"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
