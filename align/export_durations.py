#!/usr/bin/env python3
"""Export per-phoneme durations for Matcha-TTS (``use_precomputed_durations=True``).

    python align/export_durations.py [hparams/export.yaml] --corpus DIR [--model_dir RUN] [--key value ...]

Every option is a key of ``hparams/export.yaml`` (its defaults and help; ``--help`` lists them). Writes
``DIR/durations/{rel_path}.pt`` (int64, Matcha's add_blank token sequence; ``--format npy`` writes upstream Matcha's
``durations/{stem}.npy`` beside the wav folder's parent), ``DIR/durations/alignments.jsonl``,
``DIR/durations/export_report.json`` (what made the export; the same bytes for the same settings) and
``DIR/durations/export_timing.json``. Existing outputs are skipped unless ``--overwrite``.
``torchrun --nproc_per_node N align/export_durations.py ...`` (or torchrun's multi-node flags) splits the work over N
processes (gloo on CPU, nccl on CUDA: one GPU each) and writes the same files as one process.

    python align/export_durations.py [hparams/export.yaml] --corpus DIR --model_dir RUN --fit_refiner [--key value ...]

trains the boundary refiner (the frame classifier, the HMM-GMMs, the boundary detector) on the corpus and saves it to
``DIR/durations/refiner.ckpt`` (or ``--refiner_model FILE``) without writing durations. Every export that trains the
refiner saves it there too; a later export of the corpus with the same refiner settings and checkpoint aligns with
it instead of training it (``--refiner_model auto``), ~5x faster, writing the same files.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import config  # noqa: E402
from common.ddp import close_process_group, exit_process  # noqa: E402
from common.export import DEFAULT_YAML, export_corpus, load_options  # noqa: E402
from common.io import UserError, cli  # noqa: E402

USAGE = "usage: export_durations.py [HPARAMS.yaml] --corpus DIR [--model_dir RUN] [--fit_refiner] [--key value ...]"


@cli
def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    yaml_path = Path(argv.pop(0)) if argv and argv[0].endswith((".yaml", ".yml")) else DEFAULT_YAML
    if not yaml_path.is_file():
        raise UserError(f"{yaml_path}: hparams file not found")
    options = config.read_options(yaml_path)
    if {"-h", "--help"} & set(argv):
        print(__doc__.strip() + "\n\n" + config.help_text(options, USAGE))
        return 0
    fit = "--fit_refiner" in argv
    if fit:
        argv.remove("--fit_refiner")
    opts = load_options(config.parse_overrides(argv, options), yaml_path)
    if not opts.corpus.is_dir():
        raise UserError(f"{opts.corpus}: corpus folder not found")
    try:
        rep = export_corpus(opts, fit_refiner=fit)
    finally:
        close_process_group()
    if not rep:  # a torchrun process other than rank 0: rank 0 wrote the files and reports
        return 0
    if fit:
        print(f"refiner: trained on {rep['rows']} rows in {rep['timing']['seconds']:.1f} s, saved to {rep['refiner']}")
        return 0
    c, timing = rep["counts"], rep["timing"]
    where = opts.corpus / "durations"
    print(f"durations: {c['success']} written, {c['failure']} failed, {c['skipped_existing']} skipped (already there) "
          f"of {c['total']}; {len(rep['flagged'])} flagged for review; {timing['realtime_factor']}x real time; "
          f"report {where / 'export_report.json'}")
    for rel, err in list(rep["failures"].items())[:5]:
        print(f"  failed {rel}: {err}")
    return 1 if c["failure"] else 0


if __name__ == "__main__":
    exit_process(main())
