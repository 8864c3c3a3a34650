"""Fine-tuning (--pretrained_path), LoRA (--peft lora, both --save_full_model modes) and 2-process DDP (gloo) runs of
recipes/train.py on the shared tiny corpus / tiny model (tests/conftest.py). CPU only, about two minutes."""
from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common import finetune as FT  # noqa: E402
from common import model as M  # noqa: E402
from common.io import read_manifest  # noqa: E402
from common.ddp import DistributedBatchSamplerWrapper  # noqa: E402
from speechbrain.dataio.sampler import DistributedSamplerWrapper  # noqa: E402
from speechbrain.utils.checkpoints import Checkpointer  # noqa: E402
from tests.utils import TINY_MODEL, one_line_error, subprocess_env, train_tiny  # noqa: E402

LORA = dict(peft="lora", lora_r=4, lora_alpha=8, lora_dropout=0.1, overfit_epochs=2)


def best_ckpt(run: Path) -> Path:
    return Path(Checkpointer(run / "save").find_checkpoint(min_key="PER").path)


def load_state(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def ctc_logp(modules, hp, corpus: Path) -> torch.Tensor:
    rows = read_manifest(corpus / "valid.csv")[:3]
    wavs, lens = M.batch_wavs([M.load_wav(r["wav"], hp) for r in rows])
    with torch.no_grad():
        return M.ctc_log_probs(modules, hp, M.encode(modules, M.compute_feats(modules, hp, wavs, lens), lens))


def base_plus_adapters(base_run: Path, lora_ckpt: Path, info: dict):
    """The trained LoRA model as it was in memory: the base weights, LoRA wrapped around them, the saved adapters."""
    modules, hp, _ = M.load_for_inference(base_run)
    adapted = FT.add_lora(hp["model"], info["lora_r"], info["lora_alpha"], info["lora_dropout"], info["lora_conv"])
    FT.load_lora_state(adapted, lora_ckpt)
    return modules.eval(), hp


def train_cmd(data, out, *extra) -> list[str]:
    given = {str(e) for e in extra}  # a key in extra replaces TINY_MODEL's (one value per key on the command line)
    args = [str(a) for k, v in TINY_MODEL.items() if f"--{k}" not in given for a in (f"--{k}", v)]
    return [str(ROOT / "recipes/train.py"), str(ROOT / "hparams/phoneme.yaml"), "--data_folder", str(data),
            "--output_folder", str(out), "--noprogressbar", *args, *map(str, extra)]


def run(cmd, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=subprocess_env())


# ------------------------------------------------------------------------------------------------------------------
def test_lora_merge_is_exact_for_linear_and_conv():
    torch.manual_seed(0)
    for layer, x in ((torch.nn.Linear(16, 12), torch.randn(3, 5, 16)),
                     (torch.nn.Conv1d(8, 6, 5, padding=2, stride=2), torch.randn(2, 8, 21))):
        lora = FT.LoRAWithDropout(layer, rank=3, alpha=6, dropout=0.5)
        torch.nn.init.normal_(lora.adapter_up_proj.weight)  # zero at init: make the adapter do something
        assert not layer.weight.requires_grad and lora.adapter_down_proj.weight.requires_grad
        lora.eval()
        with torch.no_grad():
            assert (lora(x) - layer(x)).abs().max() > 0.1
            assert torch.allclose(lora.merged()(x), lora(x), atol=1e-5)
        lora.train()
        with torch.no_grad():  # lora_dropout acts on the adapter branch in training
            assert not torch.allclose(lora(x), lora.merged()(x), atol=1e-3)


@pytest.mark.parametrize("save_full_model,lora_conv", [(True, False), (False, True)])
def test_lora_trains_only_adapters_and_reloads(tiny_corpus, tiny_model, tmp_path, save_full_model, lora_conv):
    sweep = tmp_path / "sweep.csv"
    out = train_tiny(tiny_corpus, tmp_path / "lora", pretrained_path=tiny_model, save_full_model=save_full_model,
                     lora_conv=lora_conv, metrics_csv=sweep, **LORA)
    m = json.loads((out / "metrics.json").read_text())
    ft = m["finetune"]
    # the recipe's own checks: frozen base unchanged, adapters trained, the saved run decodes as the in-memory model
    assert ft["base_max_abs_change"] == 0.0 and ft["adapter_max_abs_change"] > 1e-4, ft
    assert ft["reload_ok"] and ft["reload_max_abs_diff"] < (2e-5 if save_full_model else 1e-6), ft
    assert "ctc_lin.w" in ft["lora_layers"] and "dec.attn.mlp_enc" in ft["lora_layers"]
    assert any(n.startswith("enc.") for n in ft["lora_layers"]) == lora_conv
    assert "lora_layers: " in (out / "train_log.txt").read_text()
    assert m["lora_r"] == 4 and m["lora_alpha"] == 8 and m["lora_dropout"] == 0.1
    card = json.loads((out / "model_card.json").read_text())
    assert card["finetuning"]["peft"] == "lora" and card["finetuning"]["save_full_model"] is save_full_model
    with open(sweep, newline="") as fh:
        (row,) = list(csv.DictReader(fh))
    assert (row["lora_r"], row["lora_alpha"], row["lora_dropout"], row["save_full_model"]) == \
        ("4", "8.0", "0.1", str(save_full_model))

    ckpt, base_ckpt = best_ckpt(out), best_ckpt(tiny_model)
    adapters = load_state(ckpt / "lora.ckpt")
    assert adapters and all("adapter_" in k for k in adapters)  # adapters only, never the base weights
    info = json.loads((out / "lora.json").read_text())
    assert Path(info["base_checkpoint"]) == base_ckpt.resolve()
    # normalization statistics are part of the frozen base
    assert torch.equal(load_state(ckpt / "normalize.ckpt")["glob_mean"],
                       load_state(base_ckpt / "normalize.ckpt")["glob_mean"])

    modules, hp, _ = M.load_for_inference(out)
    has_lora = any(isinstance(mod, FT.LoRAWithDropout) for mod in modules.modules())
    ref_modules, ref_hp = base_plus_adapters(tiny_model, ckpt / "lora.ckpt", info)
    ref = ctc_logp(ref_modules, ref_hp, tiny_corpus)
    got = ctc_logp(modules, hp, tiny_corpus)
    assert torch.allclose(got, ref, atol=1e-5, rtol=1e-6), (got - ref).abs().max()
    if save_full_model:  # a plain model: merged weights in model.ckpt, the same keys as any run
        assert not has_lora
        merged, base = load_state(ckpt / "model.ckpt"), load_state(base_ckpt / "model.ckpt")
        assert merged.keys() == base.keys()
        adapted_w = {f"{i}.{n.split('.', 1)[1]}.weight" for n in ft["lora_layers"]
                     for i, k in enumerate(["enc", "ctc_lin", "emb", "dec", "seq_lin"]) if n.split(".")[0] == k}
        assert adapted_w and adapted_w <= merged.keys()
        for k in merged:
            assert torch.equal(merged[k], base[k]) != (k in adapted_w), k  # only the adapted weights changed
    else:  # base + adapters rebuilt from lora.json; no model.ckpt written
        assert has_lora and not (ckpt / "model.ckpt").exists()
        assert torch.equal(got, ref)


def test_pretrained_path_starts_from_given_weights(tiny_corpus, tiny_model, tmp_path):
    base_ckpt = best_ckpt(tiny_model)
    # a checkpoint folder works as well as an output_folder; lr 0: after one epoch the weights are still the given ones
    out = train_tiny(tiny_corpus, tmp_path / "ft", pretrained_path=base_ckpt, lr=0.0, overfit_epochs=1)
    got, base = load_state(best_ckpt(out) / "model.ckpt"), load_state(base_ckpt / "model.ckpt")
    # every learned weight is the given one (BatchNorm running statistics keep tracking the data at lr 0)
    stats = ("running_mean", "running_var", "num_batches_tracked")
    assert got.keys() == base.keys() and all(torch.equal(got[k], base[k]) for k in base if not k.endswith(stats))
    first = json.loads((out / "metrics.json").read_text())["train_loss_history"][0]
    scratch_first = json.loads((tiny_model / "metrics.json").read_text())["train_loss_history"][0]
    assert first < 0.3 * scratch_first, (first, scratch_first)  # same data, same settings, from scratch
    assert json.loads((out / "metrics.json").read_text())["finetune"]["base_checkpoint"] == str(base_ckpt.resolve())


def test_vocabulary_mismatch_and_bad_peft_are_one_line_errors(tiny_corpus, tiny_model, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for f in ("train.csv", "valid.csv", "test.csv"):
        (data / f).write_text((tiny_corpus / f).read_text())
    tokens = (tiny_corpus / "tokens.txt").read_text().splitlines()
    (data / "tokens.txt").write_text("\n".join(tokens + [f"zz\t{len(tokens)}"]) + "\n")
    r = run([sys.executable, *train_cmd(data, tmp_path / "o", "--pretrained_path", tiny_model)])
    one_line_error(r, "vocabulary differs", str(tiny_model / "tokens.txt"), "'zz'")
    r = run([sys.executable, *train_cmd(tiny_corpus, tmp_path / "o2", "--peft", "lora")])
    one_line_error(r, "--pretrained_path")


def test_distributed_batch_wrapper_gives_each_rank_whole_batches():
    batches = [[0, 1], [2, 3]]  # one batch per rank: SpeechBrain's wrapper yields the indices of that batch instead
    assert list(DistributedSamplerWrapper(batches, num_replicas=2, rank=1, shuffle=False)) == [2, 3]
    assert list(DistributedBatchSamplerWrapper(batches, num_replicas=2, rank=1, shuffle=False)) == [[2, 3]]
    five = [[i] for i in range(5)]
    shares = [list(DistributedBatchSamplerWrapper(five, num_replicas=2, rank=r, shuffle=True)) for r in (0, 1)]
    assert len(shares[0]) == len(shares[1]) == 3  # padded to equal shares, as DDP needs
    assert all(isinstance(b, list) for b in sum(shares, [])) and {b[0] for b in sum(shares, [])} == set(range(5))


def test_ddp_two_processes_gloo(tiny_corpus, tmp_path):
    out, sweep = tmp_path / "ddp", tmp_path / "sweep.csv"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           *train_cmd(tiny_corpus, out, "--number_of_epochs", "2", "--train_subset", "8", "--max_batch_length", "4",
                      "--validation_samples", "2", "--skip_test", "True", "--metrics_csv", sweep)]
    r = run(cmd)
    assert r.returncode == 0, r.stderr[-4000:]
    m = json.loads((out / "metrics.json").read_text())
    assert m["world_size"] == 2 and m["epochs"] == 2 and m["data"]["train_utts"] == 8
    assert 1 <= m["batches_per_epoch"] * m["mean_batch_utts"] < 8  # rank 0 saw its share of the 8 utterances
    epochs = [ln.split(",")[0] for ln in (out / "train_log.txt").read_text().splitlines() if ln.startswith("epoch: ")]
    assert epochs == ["epoch: 1", "epoch: 2"]  # logged once, by the main process
    kept = sorted((out / "save").glob("CKPT+*"))  # rotated: the best by valid PER and the best by the joint score
    best = {"PER": min(v["PER"] for v in m["valid_history"]), "joint": min(v["joint"] for v in m["valid_history"])}
    metas = [yaml.safe_load((c / "CKPT.yaml").read_text()) for c in kept]
    assert 1 <= len(kept) <= 2, metas
    assert all(any(abs(meta[k] - v) < 1e-4 for meta in metas) for k, v in best.items()), (metas, best)
    with open(sweep, newline="") as fh:
        assert len(list(csv.DictReader(fh))) == 1
    modules, hp, vocab = M.load_for_inference(out)
    logp = ctc_logp(modules, hp, tiny_corpus)
    assert logp.shape[-1] == len(vocab) and torch.isfinite(logp).all()
