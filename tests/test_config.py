"""The export's configuration: hparams/export.yaml is the one place of its defaults (common/config.py reads it, the
CLI overrides it, README's table is generated from it), and the run folder / pipeline contracts."""
from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common import config  # noqa: E402
from common.export import DEFAULT_YAML, ExportOptions, load_options  # noqa: E402
from common.io import UserError  # noqa: E402

OPTIONS = config.read_options(DEFAULT_YAML)


def test_every_export_option_is_a_yaml_key_with_help():
    fields = {f.name for f in dataclasses.fields(ExportOptions)} - {"refiner", "hmm_aligner", "boundary_detector",
                                                                     "long_rows"}
    assert set(OPTIONS) == fields
    assert all(o.help for o in OPTIONS.values()), [k for k, o in OPTIONS.items() if not o.help]
    opts = load_options({"corpus": "/c"})
    assert opts.refiner.rounds == OPTIONS["refine_rounds"].default == 8
    assert opts.refiner.margin_ms == OPTIONS["refine_margin_ms"].default
    assert opts.hmm_aligner.states == OPTIONS["hmm_states"].default == 3
    assert opts.boundary_detector.epochs == OPTIONS["detector_epochs"].default == 3
    assert opts.boundary_detector.weight == pytest.approx(OPTIONS["detector_weight"].default)
    assert opts.hmm_weight == pytest.approx(2 / 3) and opts.corpus == Path("/c")
    assert load_options({"corpus": Path("/c"), "model_dir": Path("/m")}).model_dir == Path("/m")  # library callers


def test_readme_table_is_generated_from_the_yaml():
    r = subprocess.run([sys.executable, str(ROOT / "scripts/readme_tables.py"), "--check"], capture_output=True,
                       text=True, cwd=ROOT)
    assert r.returncode == 0, r.stdout + r.stderr
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for key, opt in OPTIONS.items():
        assert f"| `--{key}` | `{opt.shown()}` |" in readme, key


def test_command_line_overrides():
    ov = config.parse_overrides(["--corpus", "/data/c", "--no_refine", "--textgrid", "--refine_rounds", "4",
                                 "--sample_rate", "22050", "--device", "cuda:0", "--hmm_schedule", "[1, 2]",
                                 "--refine_minutes", "5", "--anchor", "False", "--model_dir=1234"], OPTIONS)
    assert ov == {"corpus": "/data/c", "refine": False, "textgrid": True, "refine_rounds": 4, "sample_rate": 22050,
                  "device": "cuda:0", "hmm_schedule": [1, 2], "refine_minutes": 5.0, "anchor": False,
                  "model_dir": "1234"}
    opts = load_options(ov)
    assert opts.refiner.rounds == 4 and opts.hmm_aligner.schedule == [1, 2] and not opts.refine
    for bad, needle in ((["--refine_round", "4"], "unknown option --refine_round"),
                        (["--refine_rounds", "x"], "takes a number"), (["--refine_rounds", "1.5"], "whole number"),
                        (["--textgrid", "maybe", "--corpus", "c"], "unexpected argument"),
                        (["--no_refine=1"], "takes no value"), (["--corpus"], "needs a value")):
        with pytest.raises(UserError, match=needle):
            config.parse_overrides(bad, OPTIONS)
    with pytest.raises(UserError, match="--corpus"):
        load_options({})
    with pytest.raises(UserError, match="--scores must be one of"):
        load_options({"corpus": "c", "scores": "viterbi"})
    with pytest.raises(UserError, match="not both"):
        load_options({"corpus": "c", "calibration": "a.json", "labelled": "b.tsv"})
    assert opts.hmm_aligner.mixture_score == "sum"  # the default; max reaches the HMM-GMMs' config
    assert load_options({"corpus": "c", "hmm_mixture_score": "max"}).hmm_aligner.mixture_score == "max"
    with pytest.raises(UserError, match="--hmm_mixture_score must be one of sum, max"):
        load_options({"corpus": "c", "hmm_mixture_score": "mean"})
    with pytest.raises(UserError, match="--hmm_variants: unknown key.s. win; a member may change .*win_ms"):
        load_options({"corpus": "c", "hmm_variants": [{"win_ms": 25.0}, {"win": 15.0}]})
    with pytest.raises(UserError, match="--detector_.*epochs must be > 0"):
        load_options({"corpus": "c", "detector_epochs": 0})
    assert load_options({"corpus": "c", "detector_weight": 0.0, "detector_epochs": 0}).boundary_detector.weight == 0
    ctx = load_options({"corpus": "c", "hmm_variants": [{"win_ms": 25.0, "context_min_count": 20}]})
    assert ctx.hmm_aligner.variant_configs()[0].context_min_count == 20


def test_export_help_lists_every_option():
    r = subprocess.run([sys.executable, str(ROOT / "align/export_durations.py"), "--help"], capture_output=True,
                       text=True, cwd=ROOT)
    assert r.returncode == 0
    for key in OPTIONS:
        assert f"--{key} " in r.stdout, key


def test_pipeline_stage_commands(tmp_path):
    from common.pipeline import STAGES, Pipeline

    p = Pipeline(tmp_path / "c", tmp_path / "w", prep=["--phones_tsv", "x.tsv"], train=["--number_of_epochs", "2"],
                 export=["--no_mels"], reference=tmp_path / "ref.tsv")
    cmds = {s: p.command(s) for s in STAGES}
    assert cmds["manifests"][-2:] == ["--phones_tsv", "x.tsv"] and str(p.manifests) in cmds["manifests"]
    assert cmds["train"][2].endswith("phoneme.yaml") and str(p.model) in cmds["train"]
    assert cmds["export"][-1] == "--no_mels" and str(p.model) in cmds["export"]
    assert not any(p.done(s) for s in STAGES)
    with pytest.raises(UserError, match="corpus folder not found"):
        p.run()
    with pytest.raises(UserError, match="stop_stage"):
        p.run(3, 1)
