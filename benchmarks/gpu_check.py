#!/usr/bin/env python3
"""The GPU checks, in one run that fits a lent GPU's few minutes (benchmarks/gpu_check.sh runs it there).

    python benchmarks/gpu_check.py [--device cuda] [--model_dir RUN --corpus DIR] [--out results.json]

Prints one table, one row per check (``ok`` / ``FAIL`` / ``skipped: why``, with its figures):

1. MAS: the CUDA (Triton) kernel against the CPU kernel on random batches, exact; times against the CPU kernel and
   against super-monotonic-align when it is installed (target: within 1.2x of it);
2. AMP: training steps of the recipe's model (hparams/phoneme.yaml, random audio and tokens) in fp32, bf16 and
   fp16 autocast (fp16 with a grad scaler): finite losses, seconds per step;
3. decoder: common/decoder.py's hand-written backward pass against SpeechBrain's decoder on the device (outputs and
   every gradient within 1e-4 of the largest), and one training step of each timed;
4. export throughput: ``--model_dir`` + ``--corpus`` (a trained run and a corpus, carried to the machine) exported on
   the device, first pass alone, the default (a corpus' first export: it trains the refiner) and the default
   again (it aligns with the stored refiner) (target: >= 5000x real time on an H100-class GPU for the first
   pass);
5. DDP: ``torchrun --nproc_per_node 1`` export of the same corpus with nccl (the multi-process path on one GPU).

``--device cpu`` runs the same code on the CPU (the CUDA-only rows are skipped): a dry run for this machine.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402


def _timed(fn, repeat: int = 5) -> float:
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(repeat):
        fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return (time.perf_counter() - t) / repeat


def check_mas(device: str) -> dict:
    from common.mas import available_backends, maximum_path

    if not device.startswith("cuda"):
        return {"status": "skipped: no CUDA"}
    g = torch.Generator().manual_seed(0)
    worst, rows = 0, []
    for B, U, T in ((1, 50, 200), (8, 100, 800), (32, 200, 3000)):
        v = torch.randn(B, U, T, generator=g)
        tl = torch.randint(U // 2, U + 1, (B,), generator=g)
        ml = torch.maximum(torch.randint(T // 2, T + 1, (B,), generator=g), tl)
        mask = ((torch.arange(U)[None, :, None] < tl[:, None, None])
                & (torch.arange(T)[None, None, :] < ml[:, None, None])).float()
        ref = maximum_path(v, mask, backend="numba" if "numba" in available_backends("cpu") else "reference")
        vc, mc = v.to(device), mask.to(device)
        got = maximum_path(vc, mc, backend="triton").cpu()
        worst = max(worst, int((got != ref).sum()))
        row = {"shape": [B, U, T], "triton_ms": round(1000 * _timed(lambda: maximum_path(vc, mc, backend="triton")), 3),
               "cpu_ms": round(1000 * _timed(lambda: maximum_path(v, mask), repeat=2), 3)}
        if "sma" in available_backends(device):
            row["sma_ms"] = round(1000 * _timed(lambda: maximum_path(vc, mc, backend="sma")), 3)
            row["vs_sma"] = round(row["triton_ms"] / row["sma_ms"], 2)
        rows.append(row)
    return {"status": "ok" if worst == 0 else f"FAIL: {worst} path cells differ from the CPU kernel", "sizes": rows}


def check_amp(device: str, steps: int = 5) -> dict:
    from hyperpyyaml import load_hyperpyyaml

    from common import model as M

    with tempfile.TemporaryDirectory() as tmp:
        tokens = Path(tmp) / "tokens.txt"
        tokens.write_text("".join(f"{t}\t{i}\n" for i, t in enumerate(["<blank>", "<unk>", "<bos>", "<eos>"] +
                                                                      [f"p{k}" for k in range(40)])))
        with open(ROOT / "hparams/phoneme.yaml", encoding="utf-8") as fh:
            hp = load_hyperpyyaml(fh, {"data_folder": tmp, "output_folder": tmp, "noise_csv": None})
    mods = torch.nn.ModuleDict(dict(hp["modules"])).to(device).train()
    g = torch.Generator().manual_seed(0)
    wavs = (0.1 * torch.randn(8, 16000 * 4, generator=g)).to(device)
    lens = torch.ones(8, device=device)
    toks = torch.randint(4, 44, (8, 30), generator=g).to(device)
    tok_lens = torch.ones(8, device=device)
    bos = torch.cat([torch.full((8, 1), 2, device=device), toks], 1)
    out = {}
    for prec in ("fp32", "bf16", "fp16"):
        if prec == "fp16" and not device.startswith("cuda"):
            out[prec] = "skipped: fp16 autocast is CUDA-only"
            continue
        dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[prec]
        opt = torch.optim.AdamW(mods.parameters(), lr=1e-4)
        scaler = torch.amp.GradScaler(enabled=prec == "fp16")
        losses = []

        def step():
            with torch.autocast(device_type=device.split(":")[0], dtype=dtype or torch.float32,
                                enabled=dtype is not None):
                enc = M.encode(mods, M.compute_feats(mods, hp, wavs, lens), lens)
                p_ctc = M.ctc_log_probs(mods, hp, enc)
                p_seq, _ = M.attention_decode(mods, hp, enc, lens, bos)
                loss = hp["ctc_cost"](p_ctc.float(), toks, lens, tok_lens) + hp["seq_cost"](
                    p_seq.float(), torch.cat([toks, torch.full((8, 1), 3, device=device)], 1),
                    torch.ones(8, device=device))
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            losses.append(float(loss.detach()))

        sec = _timed(step, repeat=steps)
        out[prec] = {"s_per_step": round(sec, 4), "finite": all(torch.isfinite(torch.tensor(losses)).tolist()),
                     "loss_first_last": [round(losses[0], 3), round(losses[-1], 3)]}
    ok = all(isinstance(v, str) or v["finite"] for v in out.values())
    return {"status": "ok" if ok else "FAIL: a non-finite loss", **out}


def check_decoder(device: str) -> dict:
    """common/decoder.py's hand-written backward pass against SpeechBrain's decoder on ``device`` (fp32): outputs
    and every gradient, and the time of one training step of each at the recipe's sizes."""
    from speechbrain.nnet.RNN import AttentionalRNNDecoder as SBDecoder

    from common.decoder import AttentionalRNNDecoder

    kw = dict(enc_dim=256, input_size=64, rnn_type="gru", attn_type="location", hidden_size=128, attn_dim=64,
              num_layers=1, channels=10, kernel_size=51, re_init=True, dropout=0.0)
    torch.manual_seed(0)
    ref = SBDecoder(**kw).to(device)
    fast = AttentionalRNNDecoder(**kw).to(device)
    fast.load_state_dict(ref.state_dict())
    B, U, T = 16, 60, 600
    emb, enc = torch.randn(B, U, 64, device=device), torch.randn(B, T, 256, device=device)
    lens = torch.linspace(0.5, 1.0, B, device=device)
    g_out, g_attn = torch.randn(B, U, 128, device=device), torch.randn(B, U, T, device=device)

    def run(m):
        e, x = emb.clone().requires_grad_(True), enc.clone().requires_grad_(True)
        m.zero_grad(set_to_none=True)
        out, attn = m(e, x, lens)
        ((out * g_out).sum() + (attn * g_attn).sum()).backward()
        return [out, attn, e.grad, x.grad] + [p.grad for p in m.parameters()]

    # exact fp32 products on both sides (SpeechBrain's import turns TF32 on for CUDA matmuls: ~1e-3 apart)
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        gap = max(float(((a - b).abs().max() / (b.abs().max() + 1e-12)).item())
                  for a, b in zip(run(fast), run(ref)))
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    row = {"max_relative_gap": float(f"{gap:.2e}"), "batch": [B, U, T],
           "speechbrain_ms": round(1000 * _timed(lambda: run(ref), repeat=3), 2),
           "fast_ms": round(1000 * _timed(lambda: run(fast), repeat=3), 2)}
    return {"status": "ok" if gap < 1e-4 else f"FAIL: gradients differ by {gap:.1e}", **row}


def _export(cmd_prefix: list, corpus: Path, model: Path, device: str, *extra, runs: int = 1) -> list[dict]:
    """``runs`` exports of one fresh copy of the corpus (the later ones with ``--overwrite``: with the default
    flags they align with the refiner the first one trained and stored); one result per run."""
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp) / "corpus"
        shutil.copytree(corpus, work, ignore=shutil.ignore_patterns("durations", "textgrids", "mels"))
        for k in range(runs):
            r = subprocess.run([*cmd_prefix, str(ROOT / "align/export_durations.py"), "--corpus", str(work),
                                "--model_dir", str(model), "--device", device, "--no_mels", "--no_progress", *extra,
                                *(["--overwrite"] if k else [])], capture_output=True, text=True, cwd=ROOT)
            if r.returncode != 0:
                err = r.stderr.strip().splitlines()[-1] if r.stderr.strip() else r.returncode
                return out + [{"status": f"FAIL: {err}"}] * (runs - k)
            t = json.loads((work / "durations" / "export_timing.json").read_text())
            out.append({"status": "ok", "realtime_factor": t["realtime_factor"], "audio_s": t["audio_seconds"],
                        "seconds": t["seconds"], **({"refiner": t["refiner"]} if "refiner" in t else {})})
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--model_dir", type=Path, help="a trained run folder (for the export rows)")
    ap.add_argument("--corpus", type=Path, help="a corpus to export (for the export rows)")
    ap.add_argument("--out", type=Path, help="write the results as JSON here")
    a = ap.parse_args()
    gpu = torch.cuda.get_device_name(0) if a.device.startswith("cuda") else "none"
    res = {"torch": torch.__version__, "gpu": gpu, "mas": check_mas(a.device), "amp": check_amp(a.device),
           "decoder": check_decoder(a.device)}
    if a.model_dir and a.corpus:
        py = [sys.executable]
        res["export_first_pass"] = _export(py, a.corpus, a.model_dir, a.device, "--no_refine", "--scores", "ctc",
                                           "--batch_seconds", "600")[0]
        # a corpus' first export trains the refiner and stores it; the next one aligns with it (light first pass)
        res["export_default"], res["export_stored"] = _export(py, a.corpus, a.model_dir, a.device, runs=2)
        if a.device.startswith("cuda"):
            res["export_torchrun_1"] = _export([*py, "-m", "torch.distributed.run", "--standalone",
                                                "--nproc_per_node", "1"], a.corpus, a.model_dir, a.device,
                                               "--no_refine")[0]
        else:
            res["export_torchrun_1"] = {"status": "skipped: no CUDA"}
    else:
        res["export"] = {"status": "skipped: give --model_dir and --corpus"}
    print(f"\ntorch {res['torch']}, GPU {gpu}")
    print(f"{'check':<22}{'status':<40}figures")
    for k, v in res.items():
        if isinstance(v, dict):
            figures = {x: y for x, y in v.items() if x != "status"}
            print(f"{k:<22}{str(v['status'])[:39]:<40}{json.dumps(figures)[:200]}")
    if a.out:
        a.out.write_text(json.dumps(res, indent=2))
    return 0 if all("FAIL" not in str(v.get("status", "")) for v in res.values() if isinstance(v, dict)) else 1


if __name__ == "__main__":
    sys.exit(main())
