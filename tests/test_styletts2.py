"""StyleTTS2's text aligner (common/styletts2.py): its checkpoint loads into our module and reproduces the outputs of
StyleTTS2's own code (the fixture's reference.pt), aligns a corpus through the export, fine-tunes with the recipe
(LoRA, new symbols) and is written back in StyleTTS2's format.

The fixture folder (a checkpoint in exactly StyleTTS2's format with random weights and a small config, the real
config's key -> shape table, two 24 kHz utterances, references computed by StyleTTS2's code) is found at
``../shared/fixtures/styletts2_asr`` beside the repository (CI) or ``$STYLETTS2_FIXTURE_DIR``; without it these
tests skip."""
from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from common import styletts2 as S
from common.audio import load_audio, resample
from common.durations import read_alignments
from common.mas import maximum_path
from common.model import batch_wavs, load_run
from tests.utils import ROOT, STYLETTS2_FIXTURE_ENV, one_line_error, run, styletts2_fixture, subprocess_env

FIXTURE = styletts2_fixture()
pytestmark = pytest.mark.skipif(
    FIXTURE is None, reason=f"StyleTTS2 fixture not found: neither {ROOT.parent / 'shared/fixtures/styletts2_asr'} "
                            f"nor ${STYLETTS2_FIXTURE_ENV}")
EXPORT = ROOT / "align" / "export_durations.py"
TOL = 1e-4  # measured: mel 2.5e-5, CTC logits 7.4e-6, decoder logits 7.2e-7, attention 1.8e-7 (batched: 1.3e-5)
TEXTS = {"utt0": "The quick brown fox jumps over the lazy dog.",
         "utt1": "Printing, in the only sense with which we are at present concerned."}
OVERFIT = ["--overfit_one_batch", "True", "--overfit_epochs", "2", "--overfit_repeats", "3", "--skip_test", "True",
           "--lr", "0.003", "--lora_r", "4", "--lora_alpha", "8"]


@pytest.fixture(scope="module")
def ref():
    return torch.load(FIXTURE / "reference.pt", weights_only=True)


@pytest.fixture(scope="module")
def asr():
    return S.load_checkpoint(FIXTURE / "epoch_00080.pth")


def outputs(model, ref):
    """Our module's (ctc_logit, s2s_logit, s2s_attn) on the reference mels and tokens, one utterance at a time."""
    with torch.no_grad():
        return [model(it["mel"], None, it["tokens"]) for it in ref["items"]]


def test_symbol_table_is_matchas_with_its_own_pad():
    symbols = pytest.importorskip("matcha.text.symbols").symbols
    assert len(S.SYMBOLS) == 178 and S.SYMBOLS[0] == "$" and S.SYMBOLS[1:] == symbols[1:]
    assert S.SYMBOLS.index(" ") == S.DEFAULT_BLANK  # AuxiliaryASR's CTC blank: the space's id


def test_real_config_builds_exactly_the_checkpoint_key_shapes():
    table = json.loads((FIXTURE / "real_config_shapes.json").read_text())
    model = S.StyleTTS2ASR(input_dim=80, hidden_dim=256, n_token=178, token_embedding_dim=512)
    got = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert list(got.items()) == list(table.items())  # same keys, same order, same shapes


def test_reproduces_styletts2_features_outputs_and_durations(asr, ref):
    assert asr.model.n_token == 178 and len(asr.vocab) == 178 and not asr.model.training
    for it, (ctc, s2s, attn) in zip(ref["items"], outputs(asr.model, ref)):
        wav, sr = load_audio(FIXTURE / it["wav"])
        assert sr == S.SAMPLE_RATE
        mel = S.log_mel(wav)[None]
        assert mel.shape == it["mel"].shape and mel.shape[-1] % 2 == 0
        assert (mel - it["mel"]).abs().max() < TOL
        # the tokens: StyleTTS2's ids of the espeak IPA, 0 at both ends
        ipa = ref["ipa"][ref["texts"].index(TEXTS[Path(it["wav"]).stem])]
        text, _ = S.text_batch([asr.vocab.encode(list(S.symbol_to_token(c) for c in ipa))])
        assert torch.equal(text, it["tokens"])
        for got, want in ((ctc, it["ctc_logit"]), (s2s, it["s2s_logit"]), (attn, it["s2s_attn"])):
            assert got.shape == want.shape and (got - want).abs().max() < TOL
        rows = S.token_rows(attn)  # the first decoder step dropped, as train_second.py
        path = maximum_path(rows, torch.ones_like(rows))
        assert torch.equal(path, it["attn_mono"])
        assert torch.equal(path.sum(-1).long(), it["durations_asr_frames"])  # MAS durations identical
    # the export's batched scorer (both utterances padded into one batch, from the wavs) matches as well
    wavs, lens = batch_wavs([load_audio(FIXTURE / it["wav"])[0] for it in ref["items"]])
    ids = [it["tokens"][0, 1:-1].tolist() for it in ref["items"]]
    ctc_logp, rows, frames = S.StyleTTS2Scorer(asr.model, asr.vocab).scores(wavs, lens, ids, True, False)
    for k, it in enumerate(ref["items"]):
        T, U = frames[k], len(ids[k]) + 2
        assert T == it["mask"].shape[1] == S.num_frames(int(round(float(lens[k]) * wavs.shape[1])))
        assert (ctc_logp[k, :T] - torch.log_softmax(it["ctc_logit"][0], -1)).abs().max() < TOL
        assert (rows[k, :U, :T] - S.token_rows(it["s2s_attn"])[0]).abs().max() < TOL


def test_decoder_drops_tokens_only_in_training(asr, ref):
    it = ref["items"][0]
    model = S.StyleTTS2ASR(**S.model_params(asr.config))
    model.load_state_dict(asr.model.state_dict())
    with torch.no_grad():
        model.eval()
        a = model(it["mel"], None, it["tokens"])[2]
        assert torch.equal(a, model(it["mel"], None, it["tokens"])[2])  # deterministic: no <unk> masking
        model.train()
        torch.manual_seed(0)
        emb_calls = []
        h = model.asr_s2s.embedding.register_forward_hook(lambda m, inp, out: emb_calls.append(inp[0].clone()))
        model(it["mel"], None, it["tokens"])
        h.remove()
        assert (emb_calls[0][:, 1:] == S.UNK_ID).any()  # upstream's 10 % token dropout while training


def fixture_corpus(root: Path) -> Path:
    """A Matcha corpus of the fixture's two utterances (24 kHz) plus utt1 at 22.05 kHz, with Matcha's mels."""
    from matcha.utils.audio import mel_spectrogram

    (root / "wavs").mkdir(parents=True)
    rows = []
    for name, text in TEXTS.items():
        shutil.copyfile(FIXTURE / f"{name}.wav", root / "wavs" / f"{name}.wav")
        rows.append(f"{name}|0|en-us|{text}")
    wav, sr = load_audio(FIXTURE / "utt1.wav")
    sf.write(root / "wavs" / "utt1_22k.wav", resample(wav, sr, 22050).numpy(), 22050, subtype="PCM_16")
    rows.append(f"utt1_22k|0|en-us|{TEXTS['utt1']}")
    (root / "metadata.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    for name in [*TEXTS, "utt1_22k"]:
        y, sr = sf.read(root / "wavs" / f"{name}.wav", dtype="float32")
        mel = mel_spectrogram(torch.from_numpy(y)[None], 1024, 80, sr, 256, 1024, 0, 8000, center=False)
        (root / "mels").mkdir(exist_ok=True)
        np.save(root / "mels" / f"{name}.npy", mel[0].numpy())
    return root


def export(corpus, *args, check=True):
    return run([sys.executable, EXPORT, "--corpus", corpus, "--no_progress", *args], check=check)


def check_durations(corpus: Path) -> dict:
    """Every row's durations: long, >= 0, one per token of Matcha's add_blank sequence, summing to its mel."""
    al = read_alignments(corpus / "durations" / "alignments.jsonl")
    for rel in [*TEXTS, "utt1_22k"]:
        d = torch.load(corpus / "durations" / f"{rel}.pt")
        n_tokens = len(al[rel]["aligned_tokens"]) - 2  # the two edge slots: StyleTTS2's 0 tokens
        assert d.dtype == torch.long and bool((d >= 0).all()) and len(d) == 2 * n_tokens + 1, rel
        assert int(d.sum()) == np.load(corpus / "mels" / f"{rel}.npy").shape[-1], rel
    return al


def test_export_with_the_checkpoint_sums_to_matcha_mels(tmp_path):
    pytest.importorskip("matcha.utils.audio")
    corpus = fixture_corpus(tmp_path / "corpus")
    ckpt = FIXTURE / "epoch_00080.pth"
    export(corpus, "--styletts2_asr", ckpt, "--refine_rounds", "2", "--textgrid")  # refinement on, as by default
    al = check_durations(corpus)
    rep = json.loads((corpus / "durations" / "export_report.json").read_text())
    assert rep["model_family"] == "styletts2" and rep["checkpoint"] == str(ckpt.resolve()) and rep["model_dir"] is None
    assert rep["refine"] is not None and rep["counts"]["success"] == 3
    assert rep["phonemes"]["from"] == "StyleTTS2 (espeak-ng IPA)"
    assert al["utt1"]["aligned_tokens"] == al["utt1_22k"]["aligned_tokens"]  # the 22.05 kHz row: resampled for the ASR
    for scores in ("attention", "ctc", "joint"):  # each score of the first pass alone
        export(corpus, "--styletts2_asr", ckpt, "--no_refine", "--overwrite", "--scores", scores)
        al = check_durations(corpus)
        # first pass: boundaries on the 25 ms grid of the ASR frames (frame t centred at t * 25 ms)
        ends = np.concatenate([np.asarray(a["aligned_ends_s"][:-1]) for a in al.values()])
        k = ends / S.FRAME_S + 0.5
        assert np.all(np.abs(k - np.round(k)) < 0.01), scores
    assert not (FIXTURE / ".g2p_cache.json").exists()


def test_bad_checkpoint_config_and_symbols_are_one_line_errors(tmp_path):
    corpus = tmp_path / "corpus"
    (corpus / "wavs").mkdir(parents=True)
    shutil.copyfile(FIXTURE / "utt0.wav", corpus / "wavs" / "utt0.wav")
    (corpus / "metadata.csv").write_text(f"utt0|0|en-us|{TEXTS['utt0']}\n")
    state = torch.load(FIXTURE / "epoch_00080.pth", weights_only=True)["model"]
    bad = tmp_path / "bad"
    bad.mkdir()
    shutil.copyfile(FIXTURE / "config.yml", bad / "config.yml")
    renamed = {("asr_s2s.embeddingX.weight" if k == "asr_s2s.embedding.weight" else k): v for k, v in state.items()}
    torch.save({"model": renamed}, bad / "renamed.pth")
    torch.save({"model": state}, bad / "good.pth")
    (bad / "small.yml").write_text((FIXTURE / "config.yml").read_text().replace("hidden_dim: 64", "hidden_dim: 32"))
    (bad / "odd_g2p.py").write_text("def g2p(text, language):\n    return 'ǝ ba'\n")
    args = ["--no_mels", "--no_refine"]
    one_line_error(export(corpus, "--styletts2_asr", bad / "renamed.pth", *args, check=False),
                   "renamed.pth", "'asr_s2s.embedding.weight' missing", "not a StyleTTS2 ASR")
    one_line_error(export(corpus, "--styletts2_asr", bad / "good.pth", "--styletts2_config", bad / "small.yml", *args,
                          check=False), "'init_cnn.conv.weight'", "small.yml", "does not fit")
    one_line_error(export(corpus, "--styletts2_asr", bad / "absent.pth", *args, check=False), "absent.pth", "not found")
    one_line_error(export(corpus, "--styletts2_asr", bad / "good.pth", "--styletts2_config", bad / "absent.yml", *args,
                          check=False), "absent.yml", "not found")
    r = subprocess.run([sys.executable, str(EXPORT), "--corpus", str(corpus), "--no_progress", "--styletts2_asr",
                        str(bad / "good.pth"), "--g2p", "odd_g2p:g2p", *args], capture_output=True, text=True,
                       cwd=ROOT, env={**subprocess_env(), "PYTHONPATH": f"{ROOT}:{bad}"})
    one_line_error(r, "metadata.csv:1", "'ǝ'", "not in the symbol table", "fine-tune")
    assert not (corpus / "durations").exists()
    # the recipe: a checkpoint that is not StyleTTS2's
    (tmp_path / "tokens.txt").write_text("<blank>\t0\n<unk>\t1\n<bos>\t2\n<eos>\t3\na\t4\n")
    r = run([sys.executable, ROOT / "recipes/train.py", ROOT / "hparams/styletts2_asr.yaml", "--data_folder", tmp_path,
             "--output_folder", tmp_path / "run", "--pretrained_path", bad / "renamed.pth"], check=False)
    one_line_error(r, "'asr_s2s.embedding.weight' missing")


@pytest.fixture(scope="module")
def ipa_manifests(tiny_corpus, tmp_path_factory):
    """The tiny festival corpus (22.05 kHz) with espeak-ng IPA manifests, StyleTTS2's phonemes."""
    out = tmp_path_factory.mktemp("styletts2_ipa") / "man"
    run([sys.executable, ROOT / "data_prep/make_manifests.py", "--corpus", tiny_corpus.parent / "corpus", "--out", out,
         "--valid_fraction", "0.15", "--test_fraction", "0.15", "--no_progress"])
    return out


def train(data, out, *extra, check=True):
    return run([sys.executable, ROOT / "recipes/train.py", ROOT / "hparams/styletts2_asr.yaml", "--data_folder", data,
                "--output_folder", out, "--pretrained_path", FIXTURE / "epoch_00080.pth", "--num_threads", "1",
                "--noprogressbar", *map(str, extra)], check=check, timeout=600)


def best_ckpt(run_dir: Path) -> Path:
    return load_run(run_dir).checkpoint


def outputs_on_fixture(model) -> list:
    wavs, lens = batch_wavs([load_audio(FIXTURE / f"{n}.wav")[0] for n in TEXTS])
    mels, mel_lens = S.batch_mels(wavs, lens)
    text, _ = S.text_batch([[50, 60, 70, 16, 80], [55, 65]])
    with torch.no_grad():
        return model.eval()(mels, mel_lens, text)


def test_lora_changes_only_adapters_and_writes_back(ipa_manifests, tmp_path):
    out, back = tmp_path / "lora", tmp_path / "back" / "epoch_ft.pth"
    train(ipa_manifests, out, "--peft", "lora", "--save_styletts2", back, *OVERFIT)
    ft = json.loads((out / "metrics.json").read_text())["finetune"]
    assert ft["base_max_abs_change"] == 0.0 and ft["adapter_max_abs_change"] > 1e-4, ft
    assert ft["reload_ok"] and ft["added_symbols"] == [] and "asr_s2s.project_to_n_symbols" in ft["lora_layers"]
    assert json.loads((out / S.RUN_FILE).read_text())["symbols"] == S.SYMBOLS  # the vocabulary mapping, saved
    # the merged checkpoint differs from the checkpoint exactly in the LoRA-adapted weights
    base = torch.load(FIXTURE / "epoch_00080.pth", weights_only=True)["model"]
    merged = torch.load(best_ckpt(out) / "model.ckpt", weights_only=True)
    adapted = {f"{n}.weight" for n in ft["lora_layers"]}
    assert merged.keys() == base.keys() and adapted <= merged.keys()
    for k in base:
        assert torch.equal(merged[k], base[k]) != (k in adapted), k
    # written back: StyleTTS2's format, loads strictly into our module, reproduces the run's model
    ckpt = torch.load(back, weights_only=True)
    assert set(ckpt) == {"model", "optimizer", "steps", "epochs"} and ckpt["model"].keys() == base.keys()
    import yaml

    cfg = yaml.safe_load((back.parent / "config.yml").read_text())
    assert cfg["model_params"]["n_token"] == 178 and cfg["preprocess_parasm"]["sr"] == 24000
    reloaded = S.load_checkpoint(back)
    for a, b in zip(outputs_on_fixture(reloaded.model), outputs_on_fixture(load_run(out).modules["asr"])):
        assert torch.allclose(a, b, atol=1e-6), (a - b).abs().max()
    # the run folder aligns like any --model_dir
    corpus = fixture_corpus(tmp_path / "corpus")
    export(corpus, "--model_dir", out, "--no_refine")
    check_durations(corpus)
    assert json.loads((corpus / "durations" / "export_report.json").read_text())["model_family"] == "styletts2"
    r = run([sys.executable, ROOT / "recipes/decode.py", ROOT / "hparams/styletts2_asr.yaml", "--model_dir", out,
             "--test_csv", ipa_manifests / "test.csv"], check=False)
    one_line_error(r, "fine-tuned StyleTTS2 ASR", "metrics.json")


def test_new_symbols_get_rows_and_adapters_only_runs_reload(ipa_manifests, tmp_path):
    data = tmp_path / "data"  # the corpus' 'ə' renamed to a symbol StyleTTS2's table lacks
    data.mkdir()
    for f in ("train.csv", "valid.csv", "test.csv", "tokens.txt"):
        (data / f).write_text((ipa_manifests / f).read_text(encoding="utf-8").replace("ə", "ǝ"), encoding="utf-8")
    out, back, sweep = tmp_path / "lora", tmp_path / "back" / "ft.pth", tmp_path / "sweep.csv"
    train(data, out, "--peft", "lora", "--save_full_model", "False", "--save_styletts2", back, "--metrics_csv", sweep,
          *OVERFIT)
    spec = json.loads((out / S.RUN_FILE).read_text())
    assert spec["added"] == ["ǝ"] and spec["symbols"] == S.SYMBOLS + ["ǝ"] and spec["n_base"] == 178
    m = json.loads((out / "metrics.json").read_text())
    assert m["finetune"]["base_max_abs_change"] == 0.0 and m["finetune"]["reload_ok"]
    assert not (best_ckpt(out) / "model.ckpt").exists()  # adapters (+ the new rows) only
    with open(sweep, newline="") as fh:
        (row,) = list(csv.DictReader(fh))
    assert row["model"] == "styletts2-asrcnn" and row["lora_r"] == "4"
    base = torch.load(FIXTURE / "epoch_00080.pth", weights_only=True)["model"]
    init = torch.load(out / "pretrained" / "model.ckpt", weights_only=True)  # the checkpoint with the new rows
    reloaded = S.load_checkpoint(back)  # n_token 179: symbols.json beside it
    assert reloaded.model.n_token == 179 and json.loads((back.parent / S.SYMBOLS_FILE).read_text())[-1] == "ǝ"
    sd = reloaded.model.state_dict()
    emb = "asr_s2s.embedding.weight"
    assert torch.equal(sd[emb][:178], base[emb])  # the other symbols keep their rows
    assert torch.equal(init[emb][:178], base[emb]) and (sd[emb][178] - init[emb][178]).abs().max() > 1e-4  # trained
    for a, b in zip(outputs_on_fixture(reloaded.model), outputs_on_fixture(load_run(out).modules["asr"])):
        assert torch.allclose(a, b, atol=1e-5), (a - b).abs().max()
    # the same, later, from the run folder (align/save_styletts2.py)
    again = tmp_path / "again" / "ft.pth"
    run([sys.executable, ROOT / "align/save_styletts2.py", "--model_dir", out, "--out", again])
    a, b = torch.load(again, weights_only=True), torch.load(back, weights_only=True)
    assert a["epochs"] == b["epochs"] == 2 and all(torch.equal(a["model"][k], b["model"][k]) for k in b["model"])
    assert (again.parent / "config.yml").read_text() == (back.parent / "config.yml").read_text()


def test_full_finetuning_bf16_dynamic_batches_and_resume(ipa_manifests, tmp_path):
    out = tmp_path / "full"
    args = ["--precision", "bf16", "--max_batch_length", "8", "--train_subset", "8", "--validation_samples", "2",
            "--skip_test", "True", "--lr", "0.001"]
    train(ipa_manifests, out, "--number_of_epochs", "1", *args)
    train(ipa_manifests, out, "--number_of_epochs", "2", *args)  # resumes after epoch 1
    m = json.loads((out / "metrics.json").read_text())
    assert m["resumed_from_epoch"] == 1 and m["epochs"] == 2 and m["precision"] == "bf16" and m["peft"] == "none"
    assert m["batches_per_epoch"] >= 2 and m["padding_ratio"] is not None
    base = torch.load(FIXTURE / "epoch_00080.pth", weights_only=True)["model"]
    got = torch.load(best_ckpt(out) / "model.ckpt", weights_only=True)
    emb = "asr_s2s.embedding.weight"
    assert got.keys() == base.keys() and not torch.equal(got[emb], base[emb])  # every layer trains


def test_ddp_two_processes_lora(ipa_manifests, tmp_path):
    out = tmp_path / "ddp"
    run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         ROOT / "recipes/train.py", ROOT / "hparams/styletts2_asr.yaml", "--data_folder", ipa_manifests,
         "--output_folder", out, "--pretrained_path", FIXTURE / "epoch_00080.pth", "--number_of_epochs", "1",
         "--train_subset", "8", "--max_batch_length", "8", "--validation_samples", "2", "--skip_test", "True",
         "--num_threads", "1", "--noprogressbar", "--peft", "lora"], timeout=600)
    m = json.loads((out / "metrics.json").read_text())
    assert m["world_size"] == 2 and m["epochs"] == 1 and m["finetune"]["reload_ok"]
    assert m["finetune"]["base_max_abs_change"] == 0.0
