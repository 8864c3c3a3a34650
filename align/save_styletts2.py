#!/usr/bin/env python3
"""Write a fine-tuned StyleTTS2 ASR run back in StyleTTS2's format (what ``recipes/train.py --save_styletts2`` does at
the end of training, for a run that did not ask for it).

    python align/save_styletts2.py --model_dir RUN --out OUT.pth

RUN is the output folder of ``recipes/train.py hparams/styletts2_asr.yaml``. Writes OUT.pth (``{"model", "optimizer",
"steps", "epochs"}``, the best checkpoint with LoRA merged), ``config.yml`` beside it (``n_token`` updated) and, when
the run added symbols, ``symbols.json`` (the table in id order). StyleTTS2 loads it as its text aligner
(``ASR_path`` / ``ASR_config``).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.io import UserError, cli  # noqa: E402


@cli
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model_dir", type=Path, required=True, help="the fine-tuning run folder")
    ap.add_argument("--out", type=Path, required=True, help="the .pth file to write (config.yml goes beside it)")
    a = ap.parse_args(argv)
    from common import styletts2
    from common.model import load_run

    if a.out.is_dir():
        raise UserError(f"--out {a.out} is a folder; give the .pth file to write")
    run = load_run(a.model_dir)
    if run.hparams.get("model_family") != "styletts2":
        raise UserError(f"{a.model_dir} is not a fine-tuned StyleTTS2 ASR (trained with hparams/styletts2_asr.yaml)")
    spec = run.hparams["styletts2"]
    out = styletts2.save_checkpoint(run.modules["asr"], a.out, spec.config, spec.symbols,
                                    epochs=run.hparams["epoch_counter"].current)
    print(f"wrote {out} and {out.parent / styletts2.CONFIG_FILE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
