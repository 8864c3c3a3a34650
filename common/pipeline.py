"""The path from a corpus to Matcha durations as numbered stages (icefall's ``prepare.sh`` / ``run.sh`` way):

    0 manifests  data_prep/make_manifests.py --corpus CORPUS --out WORK/manifests [prep args]
    1 train      recipes/train.py hparams/phoneme.yaml --data_folder WORK/manifests --output_folder WORK/model [...]
    2 decode     recipes/decode.py hparams/phoneme.yaml --model_dir WORK/model --test_csv WORK/manifests/test.csv [...]
    3 export     align/export_durations.py --corpus CORPUS --model_dir WORK/model [export args]
    4 evaluate   align/evaluate.py --reference REF --durations CORPUS/durations --out WORK/boundary_report.json
                 --plot WORK/boundary_errors.png (only with a reference phones.tsv)

Each stage runs its CLI in a subprocess, so a stage is exactly what a user would type. A stage whose output is
already there is skipped (``force`` runs it again); training resumes from its checkpoints anyway and the export
skips the files it already wrote (``--overwrite`` in the export args recomputes them). ``recipes/pipeline.py`` is
the command line; ``scripts/demo.sh`` and the benchmarks use it too.
"""
from __future__ import annotations

import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from common.io import UserError

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("manifests", "train", "decode", "export", "evaluate")


@dataclass
class Pipeline:
    corpus: Path
    work: Path
    prep: list = field(default_factory=list)  # extra arguments of each stage's CLI
    train: list = field(default_factory=list)
    decode: list = field(default_factory=list)
    export: list = field(default_factory=list)
    reference: Path | None = None  # phones.tsv to score the exported durations against
    hparams: Path = ROOT / "hparams" / "phoneme.yaml"
    python: str = sys.executable
    quiet: bool = False  # capture each stage's output (shown only when it fails)

    @property
    def manifests(self) -> Path:
        return self.work / "manifests"

    @property
    def model(self) -> Path:
        return self.work / "model"

    @property
    def boundary_report(self) -> Path:
        return self.work / "boundary_report.json"

    def command(self, stage: str) -> list[str]:
        py, c, m, w = self.python, self.corpus, self.manifests, self.model
        cmds = {
            "manifests": [py, ROOT / "data_prep/make_manifests.py", "--corpus", c, "--out", m, *self.prep],
            "train": [py, ROOT / "recipes/train.py", self.hparams, "--data_folder", m, "--output_folder", w,
                      *self.train],
            "decode": [py, ROOT / "recipes/decode.py", self.hparams, "--model_dir", w, "--test_csv", m / "test.csv",
                       *self.decode],
            "export": [py, ROOT / "align/export_durations.py", "--corpus", c, "--model_dir", w, *self.export],
            "evaluate": [py, ROOT / "align/evaluate.py", "--reference", self.reference, "--durations",
                         c / "durations", "--out", self.boundary_report, "--plot", self.work / "boundary_errors.png"],
        }
        return [str(x) for x in cmds[stage]]

    def done(self, stage: str) -> bool:
        """The stage's output is there (it would be skipped)."""
        return {"manifests": (self.manifests / "tokens.txt").is_file(),
                "train": (self.model / "metrics.json").is_file(),
                "decode": (self.model / "decode.jsonl").is_file(),
                "export": (self.corpus / "durations" / "export_report.json").is_file(),
                "evaluate": self.boundary_report.is_file()}[stage]

    def run_stage(self, stage: str, force: bool = False) -> float | None:
        """Run one stage (None when skipped); returns its wall-clock seconds. A failing stage is a ``UserError``
        naming it and its command (its own message is above it, or in the captured output)."""
        if stage == "evaluate" and self.reference is None:
            return None
        if not force and self.done(stage):
            print(f"[pipeline] stage {STAGES.index(stage)} {stage}: already done, skipped", flush=True)
            return None
        cmd = self.command(stage)
        print(f"[pipeline] stage {STAGES.index(stage)} {stage}: {' '.join(cmd)}", flush=True)
        t = time.time()
        r = subprocess.run(cmd, cwd=ROOT, capture_output=self.quiet, text=True)
        if r.returncode != 0:
            if self.quiet:
                sys.stderr.write((r.stdout or "")[-4000:] + (r.stderr or "")[-4000:])
            raise UserError(f"stage {stage} failed (exit {r.returncode}): {' '.join(cmd)}")
        return time.time() - t

    def run(self, first: int = 0, last: int = len(STAGES) - 1, force: bool = False) -> dict[str, float]:
        """Stages ``first`` .. ``last`` in order; returns the seconds of each stage that ran."""
        if not 0 <= first <= last < len(STAGES):
            raise UserError(f"--stage/--stop_stage must satisfy 0 <= stage <= stop_stage <= {len(STAGES) - 1}")
        if not self.corpus.is_dir():
            raise UserError(f"{self.corpus}: corpus folder not found")
        times = {}
        for stage in STAGES[first: last + 1]:
            s = self.run_stage(stage, force)
            if s is not None:
                times[stage] = round(s, 1)
        return times
