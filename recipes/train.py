#!/usr/bin/env python3
"""Train the phoneme recognizer (CTC + location attention) whose posteriors/attention give Matcha durations.

    python recipes/train.py hparams/phoneme.yaml --data_folder DATA [--output_folder OUT] [--key value ...]

DATA holds ``train.csv valid.csv test.csv tokens.txt`` (data_prep/make_manifests.py). Every yaml key is a CLI
override; SpeechBrain run options work as usual (``--precision bf16``, ``--grad_accumulation_factor 4``,
``--max_grad_norm 5``, ``--ckpt_interval_minutes 5``, ``--device cuda:0``). A killed run resumes from the newest
checkpoint (intra-epoch ones included) when started again with the same ``--output_folder``.
``--overfit_one_batch True`` is the sanity mode (train and validate on one batch; PER must reach 0).

Fine-tuning: ``--pretrained_path RUN_OR_CKPT`` starts from an earlier run's best checkpoint (same tokens.txt).
``--peft lora --lora_r 8 --lora_alpha 16 --lora_dropout 0.05`` then freezes that model and trains LoRA adapters on
its Linear layers (``--lora_conv True``: Conv layers too); ``--save_full_model True`` saves merged plain weights,
``False`` the adapters only (+ ``lora.json`` pointing at the base checkpoint). Multi-GPU/CPU:
``torchrun --nproc_per_node=N recipes/train.py hparams/phoneme.yaml ...`` (gloo is used when there is no CUDA).

Outputs in ``output_folder``: ``hyperparams.yaml`` + ``tokens.txt`` (what ``common.model.load_for_inference``
reads), ``save/`` (checkpoints: the best by valid PER and the latest), ``train_log.txt``, ``metrics.json``,
``model_card.json``, ``per_test.txt`` and, with ``--metrics_csv``, one row in that CSV.
"""
from __future__ import annotations

import csv
import dataclasses
import datetime
import fcntl
import os
import platform
import resource
import shutil
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import speechbrain as sb  # noqa: E402
import torch  # noqa: E402
from hyperpyyaml import load_hyperpyyaml  # noqa: E402
from speechbrain.dataio.sampler import DistributedSamplerWrapper  # noqa: E402
from speechbrain.utils.checkpoints import mark_as_loader, mark_as_saver, register_checkpoint_hooks  # noqa: E402
from speechbrain.utils.distributed import ddp_barrier, ddp_broadcast, if_main_process, run_on_main  # noqa: E402
from speechbrain.utils.parameter_transfer import Pretrainer  # noqa: E402
from speechbrain.utils.logger import get_logger  # noqa: E402

from common import model as M  # noqa: E402
from common.audio import load_audio  # noqa: E402
from common.io import UserError, cli, read_manifest, write_json  # noqa: E402
from common.schedules import TrainClock, cosine_lr, run_progress  # noqa: E402
from common.vocab import BOS_ID, EOS_ID, Vocab  # noqa: E402

logger = get_logger(__name__)

METRICS_CSV_HEADER = [
    "timestamp", "run_id", "run_stage", "model", "output_dir", "dataset_part", "train_fraction",
    "validation_samples", "epochs", "wer", "train_runtime", "train_loss", "eval_loss", "device", "gpu",
    "per_device_train_batch_size", "grad_accum", "effective_batch_size", "lora_r", "lora_alpha", "lora_dropout",
    "quant_weights_dtype", "quant_compute_dtype", "inference_time_sec", "peak_memory_mb", "save_full_model",
    "language", "task", "learning_rate", "seed", "eval_strategy", "eval_steps",
]
TASK = "phoneme_recognition"


class TrainingDiverged(UserError):
    """Too many consecutive non-finite losses."""


def average_last_checkpoints(brain, hparams, valid_set, eval_opts) -> dict | None:
    """``average_last`` K >= 2: average the model weights of the last K end-of-epoch checkpoints (SpeechBrain's
    ``average_checkpoints``), score the average on the validation set, and save it as a checkpoint when its
    valid PER beats every epoch (test and export then load it as the best). Single-process, full-model runs."""
    k = int(hparams["average_last"])
    if k < 2 or brain.freeze_norm_stats or _world_size() > 1 or hparams["overfit_one_batch"]:
        return None
    ckpts = brain.checkpointer.find_checkpoints(
        ckpt_predicate=lambda c: c.meta.get("end-of-epoch") and "averaged" not in c.meta, max_num_checkpoints=k)
    if len(ckpts) < 2:
        return None
    best = min((v["PER"] for v in brain.results["valid"]), default=float("inf"))
    last = max(c.meta.get("epoch", 0) for c in ckpts)
    hparams["model"].load_state_dict(sb.utils.checkpoints.average_checkpoints(ckpts, "model"))
    loader = brain.make_dataloader(valid_set, sb.Stage.VALID, **eval_opts)
    brain.on_stage_start(sb.Stage.VALID)
    brain.modules.eval()
    with torch.no_grad():
        for batch in loader:
            brain.evaluate_batch(batch, stage=sb.Stage.VALID)
    per = brain.per_metrics.summarize("error_rate")
    kept = per < best
    info = {"checkpoints": len(ckpts), "epochs": sorted(c.meta.get("epoch") for c in ckpts),
            "valid_PER": round(per, 3), "best_epoch_valid_PER": round(best, 3), "used": kept}
    hparams["train_logger"].log_stats(stats_meta={"averaged last": len(ckpts), "epoch": last},
                                      valid_stats={"PER": per, "used": int(kept)})
    if kept:
        brain.checkpointer.save_checkpoint(meta={"PER": per, "epoch": last, "averaged": len(ckpts)})
    return info


def _world_size() -> int:
    """Processes of this run (torchrun's WORLD_SIZE; 1 without DDP)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def _all_ranks(flag) -> bool:
    """``flag`` on this process AND on every other DDP process (one all_reduce; plain bool without DDP)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return bool(flag)
    t = torch.tensor([1 if bool(flag) else 0], dtype=torch.int32)
    if torch.distributed.get_backend() == "nccl":
        t = t.cuda()
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN)
    return bool(t.item())


class DistributedBatchSamplerWrapper(DistributedSamplerWrapper):
    """SpeechBrain's wrapper (DDP share of the DynamicBatchSampler's batches) without its one-batch bug: with one
    batch per rank ``itemgetter(i)`` returns the batch itself, which the loader then iterates as single indices."""

    def __iter__(self):
        batches = list(self.sampler.__iter__())
        return iter([batches[i] for i in super(DistributedSamplerWrapper, self).__iter__()])


class PhonemeBrain(sb.Brain):
    """CTC + attention phoneme recognizer; the forward pass itself lives in ``common.model``."""

    def compute_forward(self, batch, stage):
        batch = batch.to(self.device)
        wavs, wav_lens = batch.sig
        tokens_bos, _ = batch.tokens_bos
        train = stage == sb.Stage.TRAIN and self.hparams.augment
        if train:
            wavs, wav_lens = self.hparams.wav_augment(wavs, wav_lens)
        feats = M.compute_feats(self.modules, self.hparams, wavs, wav_lens, epoch=self.hparams.epoch_counter.current)
        if train:
            feats, _ = self.hparams.fea_augment(feats, wav_lens)
        enc = M.encode(self.modules, feats, wav_lens)
        out = {"p_ctc": M.ctc_log_probs(self.modules, self.hparams, enc), "wav_lens": wav_lens}
        every = max(int(self.hparams.s2s_every), 1)
        if stage != sb.Stage.TRAIN or (self.step - 1) % every == 0:  # s2s_every: the decoder on every k-th batch
            out["p_seq"], out["attn"] = M.attention_decode(self.modules, self.hparams, enc, wav_lens, tokens_bos)
        if stage == sb.Stage.TEST and self.hparams.test_beam_search:
            out["beam_hyps"] = self.hparams.beam_searcher(enc, wav_lens)[0]
        return out

    def compute_objectives(self, out, batch, stage):
        hp = self.hparams
        tokens, tok_lens = batch.tokens
        tokens_eos, eos_lens = batch.tokens_eos
        p_ctc, wav_lens, attn = out["p_ctc"], out["wav_lens"], out.get("attn")
        loss_ctc = hp.ctc_cost(p_ctc, tokens, wav_lens, tok_lens)
        loss = hp.ctc_weight * loss_ctc
        loss_seq = loss_ga = torch.zeros((), device=loss.device)
        if attn is not None:
            loss_seq = hp.seq_cost(out["p_seq"], tokens_eos, eos_lens)
            loss = loss + hp.s2s_weight * loss_seq
        epoch = hp.epoch_counter.current
        if attn is not None and hp.guided_attn_weight > 0 and (
                hp.guided_attn_epochs <= 0 or epoch <= hp.guided_attn_epochs):
            loss_ga = M.guided_attention_loss(
                attn, M.abs_lengths(eos_lens, attn.shape[1]), M.abs_lengths(wav_lens, attn.shape[2]),
                hp.guided_attn_sigma,
            )
            loss = loss + hp.guided_attn_weight * loss_ga
        if torch.isfinite(loss):
            self.parts["ctc"] += float(loss_ctc.detach())
            self.parts["n"] += 1
            if attn is not None:
                self.parts["seq"] += float(loss_seq.detach())
                self.parts["guided"] += float(loss_ga.detach())
                self.parts["n_dec"] += 1
        if stage != sb.Stage.TRAIN:
            self.ctc_metrics.append(batch.id, p_ctc, tokens, wav_lens, tok_lens)
            hyps = M.ctc_greedy(p_ctc, wav_lens)
            self.per_metrics.append(batch.id, hyps, tokens, target_len=tok_lens, ind2lab=self.ids_to_tokens)
            if "beam_hyps" in out:
                self.beam_metrics.append(
                    batch.id, out["beam_hyps"], tokens, target_len=tok_lens, ind2lab=self.ids_to_tokens
                )
        return loss

    def ids_to_tokens(self, seqs):
        return [[self.vocab.tokens[int(i)] for i in s] for s in seqs]

    def fit_batch(self, batch):
        """SpeechBrain's fit_batch, but a non-finite input or loss skips the batch (no backward, no update) and
        ``max_nonfinite_batches`` consecutive ones stop training with a clear error."""
        should_step = (self.step % self.grad_accumulation_factor) == 0
        self.on_fit_batch_start(batch, should_step)
        loss = None
        if _all_ranks(torch.isfinite(batch.sig[0]).all()):  # under DDP every rank skips together (no hang)
            with self.no_sync(not should_step):
                with self.training_ctx:
                    out = self.compute_forward(batch, sb.Stage.TRAIN)
                    loss = self.compute_objectives(out, batch, sb.Stage.TRAIN)
                if _all_ranks(torch.isfinite(loss)):
                    self.scaler.scale(loss / self.grad_accumulation_factor).backward()
                else:
                    loss = torch.tensor(float("nan"))
        if loss is None or not torch.isfinite(loss):
            self.nonfinite_run += 1
            self.nonfinite_total += 1
            logger.warning(f"non-finite loss/input in batch {list(batch.id)}; batch skipped")
            self.zero_grad(set_to_none=True)
            if self.nonfinite_run >= self.hparams.max_nonfinite_batches:
                raise TrainingDiverged(
                    f"{self.nonfinite_run} consecutive batches had a non-finite loss or input (epoch "
                    f"{self.hparams.epoch_counter.current}, last batch {list(batch.id)[:4]}); check those wavs for "
                    f"NaN/inf samples or lower --lr (now {self.optimizer.param_groups[0]['lr']:g})"
                )
            return torch.tensor(float("nan"))
        self.nonfinite_run = 0
        if should_step:
            self.optimizers_step()
        self.on_fit_batch_end(batch, out, loss, should_step)
        return loss.detach().cpu()

    def _train_loader_specifics(self, dataset, loader_kwargs):
        loader_kwargs = super()._train_loader_specifics(dataset, loader_kwargs)
        if isinstance(self.train_sampler, DistributedSamplerWrapper):
            self.train_sampler.__class__ = DistributedBatchSamplerWrapper
        return loader_kwargs

    def on_fit_batch_start(self, batch, should_step):
        if self.freeze_norm_stats:  # LoRA: the frozen base keeps its BatchNorm statistics too
            for m in self.modules.modules():
                if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                    m.eval()
        wavs, lens = batch.sig
        n = wavs.shape[1]
        self.pad["total"] += n * wavs.shape[0]
        self.pad["real"] += float((lens * n).round().sum())
        self.pad["batches"] += 1
        self.pad["utts"] += wavs.shape[0]
        if not should_step:
            return
        hp = self.hparams
        warmup = int(hp.warmup_steps)
        scale = min(1.0, (self.optimizer_step + 1) / warmup) if warmup > 0 else 1.0  # linear lr warm-up
        if hp.lr_schedule == "cosine":  # decays to lr * lr_final_ratio at the end of the epochs or the time budget
            try:
                per_epoch = len(self.train_sampler)
            except TypeError:
                per_epoch = self.results.get("batches_per_epoch", 0)
            progress = run_progress(hp.epoch_counter.current, self.step, per_epoch, hp.epoch_counter.limit,
                                    self.clock.elapsed(), float(hp.max_train_minutes) * 60)
            lr = cosine_lr(float(hp.lr), progress, float(hp.lr_final_ratio)) * scale
        elif warmup > 0 and self.optimizer_step <= warmup:  # then NewBob's value
            lr = hp.lr_annealing.hyperparam_value * scale
        else:
            return
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def on_stage_start(self, stage, epoch=None):
        self.parts = Counter()
        self.stage_t0 = time.time()
        if stage == sb.Stage.TRAIN:
            self.pad = Counter()
        else:
            self.ctc_metrics = self.hparams.ctc_stats()
            self.per_metrics = self.hparams.per_stats()
            self.beam_metrics = self.hparams.per_stats()

    def _parts(self):
        n, n_dec = max(self.parts["n"], 1), max(self.parts["n_dec"], 1)
        return {"ctc": round(self.parts["ctc"] / n, 4), "seq": round(self.parts["seq"] / n_dec, 4),
                "guided": round(self.parts["guided"] / n_dec, 4)}

    def on_stage_end(self, stage, stage_loss, epoch=None):
        hp, res = self.hparams, self.results
        if stage == sb.Stage.TRAIN:
            pad_ratio = 1.0 - self.pad["real"] / max(self.pad["total"], 1)
            self.train_stats = {"loss": stage_loss, **self._parts(), "padding_ratio": round(pad_ratio, 4)}
            res["padding_ratio"].append(pad_ratio)
            res["batches_per_epoch"] = self.pad["batches"]
            res["mean_batch_utts"] = self.pad["utts"] / max(self.pad["batches"], 1)
            res["train_loss"].append(stage_loss)
            res["train_time"] += time.time() - self.stage_t0
            return
        per = self.per_metrics.summarize("error_rate")
        stats = {"loss": stage_loss, **self._parts(), "PER": per}
        if stage == sb.Stage.VALID:
            if hp.lr_schedule == "cosine":
                old_lr = self.optimizer.param_groups[0]["lr"]
            else:
                old_lr, new_lr = hp.lr_annealing(stage_loss if hp.lr_anneal_on == "loss" else per)
                sb.nnet.schedulers.update_learning_rate(self.optimizer, new_lr)
            res["valid"].append({"epoch": epoch, "loss": stage_loss, "PER": per, "lr": old_lr})
            res["valid_time"] = time.time() - self.stage_t0
            self.checkpointer.save_and_keep_only(meta={"PER": per, "epoch": epoch}, min_keys=["PER"],
                                                 num_to_keep=max(1, int(hp.average_last)))
            # logged only once its end-of-epoch checkpoint exists: a run killed in between would otherwise resume
            # from the epoch's last intra-epoch checkpoint, finish the epoch again and log it twice
            meta = {"epoch": epoch, "lr": old_lr, "nonfinite_skipped": self.nonfinite_total}
            for lg in self.loggers:
                lg.log_stats(stats_meta=meta, train_stats=self.train_stats, valid_stats=stats)
            budget = float(hp.max_train_minutes) * 60
            spent = self.clock.elapsed()  # includes the runs before a resume
            # the next epoch would overrun the budget; under DDP every process follows rank 0's clock (ranks that
            # decided differently would wait for each other forever in the next epoch's collectives)
            if ddp_broadcast(budget > 0 and spent + spent / max(epoch, 1) > budget):
                logger.info(f"max_train_minutes={hp.max_train_minutes}: stopping after epoch {epoch} ({spent:.0f} s)")
                hp.epoch_counter.limit = epoch
        else:
            if len(self.beam_metrics.scores) > 0:
                stats["PER_beam"] = self.beam_metrics.summarize("error_rate")
            for lg in self.loggers:
                lg.log_stats(stats_meta={"epoch loaded": hp.epoch_counter.current}, test_stats=stats)
            res["test"] = {"loss": stage_loss, "PER": per, "PER_beam": stats.get("PER_beam"),
                           "time": time.time() - self.stage_t0}
            if if_main_process():
                with open(hp.per_file, "w", encoding="utf-8") as w:
                    w.write("CTC greedy PER:\n")
                    self.per_metrics.write_stats(w)
                    if "PER_beam" in stats:
                        w.write("\nattention beam search (+CTC) PER:\n")
                        self.beam_metrics.write_stats(w)


# ---------------------------------------------------------------------------------------------------------------------
def _rows(hparams, split: str, vocab: Vocab, counts: Counter) -> dict:
    """Manifest rows -> {ID: item}; unknown token = UserError naming the row; CTC-infeasible rows skipped+counted."""
    path = hparams[f"{split}_csv"]
    rows = read_manifest(path)
    if split == "train":
        if not 0 < float(hparams["train_fraction"]) <= 1:
            raise UserError(f"--train_fraction must be in (0, 1], got {hparams['train_fraction']}")
        rows = rows[: max(1, int(round(len(rows) * float(hparams["train_fraction"]))))]
        if int(hparams["train_subset"]) > 0:
            rows = rows[: int(hparams["train_subset"])]
    if split == "valid" and int(hparams["validation_samples"]) > 0:
        rows = rows[: int(hparams["validation_samples"])]
    speed = max(hparams["speeds"]) / 100 if split == "train" and hparams["speed_perturb"] else 1.0
    data = {}
    for n, r in enumerate(rows, 2):  # line 1 is the header
        where = f"{path}:{n} (ID {r['ID']})"
        if r["ID"] in data:
            raise UserError(f"{where}: duplicate ID")
        ids = vocab.encode(r["phn"], where=where)
        try:
            dur = float(r["duration"])
        except ValueError:
            raise UserError(f"{where}: duration {r['duration']!r} is not a number") from None
        if not ids:
            counts[f"{split}_empty_phn"] += 1
            continue
        frames = M.num_feature_frames(int(dur * hparams["sample_rate"] / speed), hparams["hop_samples"])
        if frames < M.ctc_min_frames(ids):
            counts[f"{split}_ctc_infeasible"] += 1
            logger.warning(f"{where}: {frames} frames < {M.ctc_min_frames(ids)} needed by CTC; skipped")
            continue
        wav = r["wav"].replace("$data_root", str(hparams["data_folder"]))
        data[r["ID"]] = {"wav": wav, "duration": dur, "token_ids": ids, "language": r.get("language", "")}
    if not data:
        raise UserError(f"{path}: no usable rows left ({dict(counts)}); check durations and phn")
    counts[f"{split}_utts"] = len(data)
    counts[f"{split}_hours"] = round(sum(d["duration"] for d in data.values()) / 3600, 4)
    return data


def dataio_prepare(hparams, vocab: Vocab):
    """Datasets (train/valid/test) with ``sig``, ``tokens``, ``tokens_bos``, ``tokens_eos`` + a batch sampler."""
    counts: Counter = Counter()
    splits = ["train", "valid"] + ([] if hparams["skip_test"] else ["test"])
    data = {s: _rows(hparams, s, vocab, counts) for s in splits}
    if hparams["overfit_one_batch"]:  # the same batch, overfit_repeats steps per epoch
        first = dict(list(data["train"].items())[: int(hparams["overfit_batch_size"])])
        reps = {f"{k}#{i}": v for i in range(int(hparams["overfit_repeats"])) for k, v in first.items()}
        data = {"train": reps, "valid": first}
    datasets = {s: sb.dataio.dataset.DynamicItemDataset(d) for s, d in data.items()}
    sr = int(hparams["sample_rate"])

    @sb.utils.data_pipeline.takes("wav")
    @sb.utils.data_pipeline.provides("sig")
    def audio_pipeline(wav):
        return load_audio(wav, sr)[0]

    @sb.utils.data_pipeline.takes("token_ids")
    @sb.utils.data_pipeline.provides("tokens", "tokens_bos", "tokens_eos")
    def token_pipeline(ids):
        yield torch.LongTensor(ids)
        yield torch.LongTensor([BOS_ID] + ids)
        yield torch.LongTensor(ids + [EOS_ID])

    dsets = list(datasets.values())
    sb.dataio.dataset.add_dynamic_item(dsets, audio_pipeline)
    sb.dataio.dataset.add_dynamic_item(dsets, token_pipeline)
    sb.dataio.dataset.set_output_keys(dsets, ["id", "sig", "tokens", "tokens_bos", "tokens_eos"])
    for s in ("valid", "test"):
        if s in datasets:
            datasets[s] = datasets[s].filtered_sorted(sort_key="duration")

    sampler = None
    if hparams["dynamic_batching"] and not hparams["overfit_one_batch"]:
        sampler = sb.dataio.sampler.DynamicBatchSampler(
            datasets["train"], max_batch_length=float(hparams["max_batch_length"]),
            num_buckets=int(hparams["num_buckets"]), length_func=lambda x: x["duration"],
            shuffle=bool(hparams["shuffle_buckets"]), batch_ordering="random",
            max_batch_ex=int(hparams["max_batch_ex"]), seed=int(hparams["seed"]),
        )
    return datasets, sampler, counts


# ---------------------------------------------------------------------------------------------------------------------
@register_checkpoint_hooks
class MergedLoRAModel:
    """Checkpoint recoverable ``model`` of a LoRA run with ``--save_full_model True``: writes the adapters folded into
    the base weights (a plain ``model.ckpt``). Loading it is a no-op: on resume the base comes from
    ``--pretrained_path`` and the adapters from ``lora.ckpt``."""

    def __init__(self, adapted):
        self.adapted = adapted

    @mark_as_saver
    def _save(self, path):
        torch.save(M.merge_lora(self.adapted).state_dict(), path)

    @mark_as_loader
    def _load(self, path, end_of_epoch):
        del path, end_of_epoch


def check_finetune_args(hparams, vocab: Vocab):
    """Validate --peft/--pretrained_path before anything is written; returns the pretrained checkpoint folder."""
    peft = str(hparams["peft"] or "none").lower()
    if peft not in ("none", "lora"):
        raise UserError(f"--peft must be none or lora, got {hparams['peft']!r}")
    if peft == "lora" and not hparams["pretrained_path"]:
        raise UserError("--peft lora adapts a trained model: give it with --pretrained_path (an earlier output_folder)")
    if not hparams["pretrained_path"]:
        return None
    ckpt = M.find_pretrained_checkpoint(hparams["pretrained_path"])
    M.check_pretrained(ckpt, hparams["model"], vocab, hparams["pretrained_path"])
    return ckpt


def setup_finetune(hparams, ckpt) -> dict:
    """``--pretrained_path``: load its model + normalization (SpeechBrain Pretrainer). ``--peft lora``: freeze the
    model and wrap its Linear (and with ``--lora_conv`` Conv) layers in LoRA adapters; the checkpointer then saves
    ``lora.ckpt`` (adapters) and, with ``--save_full_model True``, ``model.ckpt`` (merged weights)."""
    peft = str(hparams["peft"] or "none").lower()
    info = {"peft": peft, "pretrained_path": hparams["pretrained_path"], "base_checkpoint": None}
    if ckpt is not None:
        loadables = {"model": hparams["model"], "normalize": hparams["normalize"]}
        paths = {k: str(ckpt / f"{k}.ckpt") for k in loadables if (ckpt / f"{k}.ckpt").is_file()}
        pretrainer = Pretrainer(collect_in=Path(hparams["output_folder"]) / "pretrained",
                                loadables={k: loadables[k] for k in paths}, paths=paths)
        run_on_main(pretrainer.collect_files)
        pretrainer.load_collected()
        info["base_checkpoint"] = str(ckpt)
        logger.info(f"initialised {', '.join(paths)} from {ckpt}")
    if peft == "lora":
        adapted = M.add_lora(hparams["model"], hparams["lora_r"], hparams["lora_alpha"], hparams["lora_dropout"],
                             hparams["lora_conv"])
        hparams["normalize"].update_until_epoch = 0  # the base model's feature statistics stay as they were
        ckpter = hparams["checkpointer"]
        del ckpter.recoverables["model"]
        ckpter.add_recoverable("lora", adapted)
        if hparams["save_full_model"]:
            ckpter.add_recoverable("model", MergedLoRAModel(adapted))
        names = {str(i): k for i, m in enumerate(hparams["model"]) for k, v in hparams["modules"].items() if v is m}
        layers = [".".join([names.get(n.split(".")[0], n.split(".")[0])] + n.split(".")[1:])
                  for n in adapted.replace_layers]
        n_train = sum(p.numel() for p in adapted.parameters() if p.requires_grad)
        n_all = sum(p.numel() for p in adapted.parameters())
        info.update(lora_r=int(hparams["lora_r"]), lora_alpha=float(hparams["lora_alpha"]),
                    lora_dropout=float(hparams["lora_dropout"]), lora_conv=bool(hparams["lora_conv"]),
                    lora_layers=layers, save_full_model=bool(hparams["save_full_model"]),
                    trainable_params=n_train, total_params=n_all)
        info["_adapted"] = adapted
        logger.info(f"LoRA r={info['lora_r']} alpha={info['lora_alpha']} dropout={info['lora_dropout']} on "
                    f"{len(layers)} layers: {', '.join(layers)}; {n_train} of {n_all} parameters trainable; saving "
                    f"{'merged full weights + adapters' if info['save_full_model'] else 'adapters only'}")
        hparams["train_logger"].log_stats(stats_meta={"lora_layers": " ".join(layers)})
        run_on_main(_write_lora_file, args=[hparams, info])
    return info


def _write_lora_file(hparams, info) -> None:
    write_json(Path(hparams["output_folder"]) / M.LORA_FILE, _public(info))


def _public(info: dict) -> dict:
    return {k: v for k, v in info.items() if not k.startswith("_")}


def check_lora_reload(hparams, info: dict, datasets) -> dict:
    """Reload the saved run with ``load_for_inference`` and compare its CTC log-probs with the in-memory model
    (after ``evaluate`` loaded the best checkpoint) on a few valid utterances; also how much the frozen base and the
    adapters moved from their starting values."""
    adapted = info["_adapted"]
    mods = {k: v for k, v in hparams["modules"].items()}
    was = {k: m.training for k, m in mods.items()}
    valid = datasets["valid"]
    items = [valid[i] for i in range(min(3, len(valid)))]
    wavs, wav_lens = M.batch_wavs([it["sig"] for it in items])
    with torch.no_grad():
        for m in mods.values():
            m.eval()
        ref = M.ctc_log_probs(mods, hparams, M.encode(mods, M.compute_feats(mods, hparams, wavs, wav_lens), wav_lens))
        for k, m in mods.items():
            m.train(was[k])
        re_mods, re_hp, _ = M.load_for_inference(hparams["output_folder"])
        got = M.ctc_log_probs(re_mods, re_hp,
                              M.encode(re_mods, M.compute_feats(re_mods, re_hp, wavs, wav_lens), wav_lens))
    diff = float((ref - got).abs().max())
    ok = bool(torch.allclose(got, ref, atol=1e-5, rtol=1e-6))  # merging re-rounds: a few float32 ulps at log p ~ -20
    start = info["_start"]
    now = {k: v.detach() for k, v in adapted.state_dict(keep_vars=True).items()}
    base_change = max((float((now[k] - v).abs().max()) for k, v in start.items() if "adapter_" not in k), default=0.0)
    adapter_change = max((float((now[k] - v).abs().max()) for k, v in start.items() if "adapter_" in k), default=0.0)
    (logger.info if ok else logger.warning)(
        f"LoRA reload check: max |CTC log-prob difference| saved vs in-memory = {diff:.2e}{'' if ok else ' (!)'}")
    return {"reload_max_abs_diff": diff, "reload_ok": ok, "base_max_abs_change": base_change, "adapter_max_abs_change": adapter_change}


def check_metrics_csv(path) -> None:
    if path and os.path.isfile(path) and os.path.getsize(path) > 0:
        with open(path, newline="", encoding="utf-8") as fh:
            header = next(csv.reader(fh), [])
        if header != METRICS_CSV_HEADER:
            raise UserError(f"{path}: existing header differs from the sweep header; use another --metrics_csv")


def append_metrics_csv(path, row: dict) -> None:
    """Append one row under an exclusive lock; the header is written once, by whoever finds the file empty."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+", newline="", encoding="utf-8") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            fh.seek(0, os.SEEK_END)
            writer = csv.DictWriter(fh, fieldnames=METRICS_CSV_HEADER)
            if fh.tell() == 0:
                writer.writeheader()
            writer.writerow({k: row.get(k, "") for k in METRICS_CSV_HEADER})
            fh.flush()
            os.fsync(fh.fileno())
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _versions() -> dict:
    import torchaudio

    commit = ""
    try:
        import subprocess

        commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return {"python": platform.python_version(), "torch": torch.__version__, "torchaudio": torchaudio.__version__,
            "speechbrain": sb.__version__, "git_commit": commit}


def _peak_memory_mb(device: str) -> float:
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _scalar_hparams(hparams) -> dict:
    return {k: v for k, v in hparams.items() if isinstance(v, (int, float, str, bool, list, type(None)))
            and not k.startswith("__")}


def write_reports(brain, hparams, counts, vocab, run_id, t_start, resumed_epoch, finetune=None) -> dict:
    res, out = brain.results, Path(hparams["output_folder"])
    device = str(brain.device)
    best = min(res["valid"], key=lambda v: v["PER"]) if res["valid"] else {}
    test = res.get("test") or {}
    nparams = sum(p.numel() for p in brain.modules.parameters())
    finetune = finetune or {"peft": "none"}
    lora = finetune["peft"] == "lora"
    batch_utts = res.get("mean_batch_utts", 0.0)
    metrics = {
        "run_id": run_id, "model": hparams["model_name"], "task": TASK, "output_dir": str(out),
        "data": dict(counts), "epochs": res.get("epochs_trained", hparams["epoch_counter"].current),
        "averaged_checkpoints": res.get("averaged"),
        "resumed_from_epoch": resumed_epoch,
        "train_loss": res["train_loss"][-1] if res["train_loss"] else None,
        "train_loss_history": res["train_loss"], "valid_history": res["valid"],
        "best_valid_PER": best.get("PER"), "best_epoch": best.get("epoch"),
        "valid_loss": res["valid"][-1]["loss"] if res["valid"] else None,
        "test_PER": test.get("PER"), "test_PER_beam": test.get("PER_beam"), "test_loss": test.get("loss"),
        "padding_ratio": (sum(res["padding_ratio"]) / len(res["padding_ratio"])) if res["padding_ratio"] else None,
        "padding_ratio_per_epoch": res["padding_ratio"], "mean_batch_utts": batch_utts,
        "nonfinite_batches_skipped": brain.nonfinite_total,
        "skipped": {k: v for k, v in counts.items() if "infeasible" in k or "empty" in k},
        "train_runtime_sec": round(time.time() - t_start, 2), "train_stage_sec": round(res["train_time"], 2),
        "valid_inference_sec": round(res.get("valid_time", 0.0), 3),
        "peak_memory_mb": round(_peak_memory_mb(device), 1), "device": device, "precision": brain.precision,
        "grad_accum": brain.grad_accumulation_factor, "n_params": nparams, "notes": hparams["notes"],
        "overfit_one_batch": bool(hparams["overfit_one_batch"]),
        "world_size": _world_size(), "batches_per_epoch": res.get("batches_per_epoch"),
        "pretrained_path": finetune.get("pretrained_path"),
        "peft": finetune["peft"], "lora_r": finetune.get("lora_r"), "lora_alpha": finetune.get("lora_alpha"),
        "lora_dropout": finetune.get("lora_dropout"), "save_full_model": bool(hparams["save_full_model"]),
        "finetune": finetune,
    }
    write_json(out / "metrics.json", metrics)
    card = {
        "task": TASK, "model": hparams["model_name"], "run_id": run_id,
        "architecture": {"features": f"Fbank {hparams['n_mels']} mel, hop {hparams['hop_length']} ms, "
                                     f"win {hparams['win_length']} ms, {hparams['sample_rate']} Hz, global CMVN",
                         "encoder": type(hparams["enc"]).__name__, "frame_shift_ms": hparams["hop_length"],
                         "ctc_blank_id": hparams["blank_index"], "bos_id": hparams["bos_index"],
                         "eos_id": hparams["eos_index"], "decoder": "AttentionalRNNDecoder (location)",
                         "n_params": nparams},
        "data": {"data_folder": str(hparams["data_folder"]), "train_csv": str(hparams["train_csv"]),
                 "valid_csv": str(hparams["valid_csv"]), "test_csv": None if hparams["skip_test"] else
                 str(hparams["test_csv"]), **dict(counts)},
        "vocabulary": {"size": len(vocab), "tokens_file": "tokens.txt", "tokens": vocab.tokens,
                       "symbol_ids": vocab.symbol_ids},
        "hparams": _scalar_hparams(hparams), "versions": _versions(),
        "inference": "common.model.load_for_inference(output_folder) -> (modules, hparams, vocab); "
                     "common.model.forward_scores(...)",
        "results": {"best_valid_PER": metrics["best_valid_PER"], "test_PER": metrics["test_PER"],
                    "test_PER_beam": metrics["test_PER_beam"]},
        "finetuning": {**finetune, "saved_weights": ("merged (LoRA folded into plain weights)" if
                                                     hparams["save_full_model"] else
                                                     "LoRA adapters only (lora.ckpt) + lora.json -> base checkpoint")
                       if lora else "full model"},
    }
    write_json(out / "model_card.json", card)
    if hparams["metrics_csv"]:
        gpu = torch.cuda.get_device_name(brain.device) if device.startswith("cuda") else ""
        compute = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}[brain.precision]
        world = _world_size()
        langs = Counter(hparams.get("_languages", []))
        append_metrics_csv(hparams["metrics_csv"], {
            "timestamp": datetime.datetime.now().isoformat(timespec="seconds"), "run_id": run_id,
            "run_stage": hparams["run_stage"], "model": hparams["model_name"], "output_dir": str(out),
            "dataset_part": hparams["dataset_part"], "train_fraction": hparams["train_fraction"],
            "validation_samples": hparams["validation_samples"], "epochs": metrics["epochs"],
            "wer": "" if best.get("PER") is None else round(best["PER"], 4),
            "train_runtime": metrics["train_runtime_sec"], "train_loss": _r(metrics["train_loss"]),
            "eval_loss": _r(metrics["valid_loss"]), "device": device, "gpu": gpu,
            "per_device_train_batch_size": round(batch_utts, 2), "grad_accum": brain.grad_accumulation_factor,
            "effective_batch_size": round(batch_utts * brain.grad_accumulation_factor * world, 2),
            "quant_weights_dtype": "fp32", "quant_compute_dtype": compute,
            "inference_time_sec": metrics["valid_inference_sec"], "peak_memory_mb": metrics["peak_memory_mb"],
            "save_full_model": hparams["save_full_model"],
            "lora_r": finetune.get("lora_r", ""), "lora_alpha": finetune.get("lora_alpha", ""),
            "lora_dropout": finetune.get("lora_dropout", ""),
            "language": hparams["language"] or (langs.most_common(1)[0][0] if langs else ""),
            "task": TASK, "learning_rate": hparams["lr"], "seed": hparams["seed"],
            "eval_strategy": hparams["eval_strategy"], "eval_steps": hparams["eval_steps"],
        })
    return metrics


def _r(x):
    return "" if x is None else round(float(x), 4)


def save_run_files(hparams_file, overrides, hparams, vocab_path) -> None:
    """hyperparams.yaml (overrides baked in) + tokens.txt copy: everything load_for_inference needs."""
    out = Path(hparams["output_folder"])
    sb.create_experiment_directory(experiment_directory=str(out), hyperparams_to_save=hparams_file,
                                   overrides=overrides)
    dst = out / M.TOKENS_FILE
    if dst.is_file() and dst.read_text(encoding="utf-8") != Path(vocab_path).read_text(encoding="utf-8"):
        if any((out / "save").glob("CKPT*")):
            raise UserError(f"{dst} differs from {vocab_path}: this output_folder was trained with another "
                            f"vocabulary; use a new --output_folder")
    shutil.copyfile(vocab_path, dst)


@cli
def main(argv=None) -> int:
    hparams_file, run_opts, overrides = sb.parse_arguments(sys.argv[1:] if argv is None else argv)
    try:
        with open(hparams_file, encoding="utf-8") as fin:
            hparams = load_hyperpyyaml(fin, overrides)
    except FileNotFoundError as err:
        raise UserError(f"cannot load hparams: {err}") from None
    if hparams["overfit_one_batch"] and run_opts["debug"]:
        raise UserError("--overfit_one_batch and SpeechBrain's --debug are different modes; pick one")
    check_metrics_csv(hparams["metrics_csv"])
    if int(hparams["num_threads"]) > 0:
        torch.set_num_threads(int(hparams["num_threads"]))
    vocab = Vocab.load(hparams["tokens_file"])
    if hparams["output_neurons"] != len(vocab):
        raise UserError(f"output_neurons={hparams['output_neurons']} but {hparams['tokens_file']} has {len(vocab)}")
    if (os.environ.get("LOCAL_RANK") is not None and run_opts["distributed_backend"] == "nccl"
            and "distributed_backend" not in run_opts.overridden_args and not torch.cuda.is_available()):
        logger.info("torchrun without CUDA: using the gloo backend")  # nccl needs GPUs
        run_opts = dataclasses.replace(run_opts, distributed_backend="gloo",
                                       overridden_args=run_opts.overridden_args | {"distributed_backend"})
    pretrained_ckpt = check_finetune_args(hparams, vocab)
    sb.utils.distributed.ddp_init_group(run_opts)
    run_on_main(save_run_files, args=[hparams_file, overrides, hparams, hparams["tokens_file"]])
    finetune = setup_finetune(hparams, pretrained_ckpt)
    if "_adapted" in finetune:
        finetune["_start"] = {k: v.detach().clone() for k, v in finetune["_adapted"].state_dict().items()}
    run_id = hparams["run_id"] or datetime.datetime.now().strftime("%Y%m%d_%H%M%S")

    datasets, sampler, counts = dataio_prepare(hparams, vocab)
    hparams["_languages"] = [d["language"] for d in datasets["train"].data.values() if d.get("language")]
    hparams["augment"] = not hparams["overfit_one_batch"]
    if hparams["overfit_one_batch"]:
        hparams["epoch_counter"].limit = int(hparams["overfit_epochs"])
    if hparams["tensorboard"]:
        try:
            tb = sb.utils.train_logger.TensorboardLogger(hparams["tensorboard_folder"])
        except ImportError:
            raise UserError("--tensorboard True needs the tensorboard package (pip install tensorboard)") from None
    if _world_size() > 1 and not torch.cuda.is_available():
        # SpeechBrain converts BatchNorm to SyncBatchNorm under DDP, which runs only on CUDA: with gloo on CPU each
        # process keeps its own BatchNorm statistics instead.
        class _LocalBatchNorm:
            convert_sync_batchnorm = staticmethod(lambda module, *args, **kwargs: module)

        sb.core.SyncBatchNorm = _LocalBatchNorm
    brain = PhonemeBrain(modules=hparams["modules"], opt_class=hparams["opt_class"], hparams=hparams,
                         run_opts=run_opts, checkpointer=hparams["checkpointer"])
    brain.vocab = vocab
    brain.freeze_norm_stats = str(hparams["peft"] or "none").lower() == "lora"
    brain.loggers = [hparams["train_logger"]] + ([tb] if hparams["tensorboard"] else [])
    brain.results = {"train_loss": [], "valid": [], "padding_ratio": [], "train_time": 0.0}
    brain.nonfinite_run = brain.nonfinite_total = 0
    brain.pad = Counter()
    brain.clock = TrainClock()  # training seconds across resumes (the max_train_minutes budget, the cosine lr)
    brain.checkpointer.add_recoverable("train_clock", brain.clock, optional_load=True)
    hparams["train_logger"].log_stats(stats_meta={"data": " ".join(f"{k}={v}" for k, v in sorted(counts.items()))})
    logger.info(f"data: {dict(counts)}")

    loader_opts = {"num_workers": int(hparams["num_workers"])}
    if sampler is not None:
        train_opts = {**loader_opts, "batch_sampler": sampler}
        brain.train_sampler = sampler  # so Brain calls set_epoch(): new shuffles each epoch, exact on resume
    else:
        bs = int(hparams["overfit_batch_size"] if hparams["overfit_one_batch"] else hparams["batch_size"])
        train_opts = {**loader_opts, "batch_size": bs, "shuffle": not hparams["overfit_one_batch"]}
    eval_opts = {**loader_opts, "batch_size": int(hparams["batch_size"])}

    t0 = time.time()
    if hasattr(brain.checkpointer, "remove_incomplete"):
        for d in brain.checkpointer.remove_incomplete():  # a save interrupted by a kill
            logger.info(f"removed incomplete checkpoint {d}")
    brain.checkpointer.recover_if_possible()  # only to report where we resume; fit() recovers again
    resumed_epoch = hparams["epoch_counter"].current
    if resumed_epoch:
        logger.info(f"resuming after epoch {resumed_epoch}")
    brain.fit(hparams["epoch_counter"], datasets["train"], datasets["valid"], train_loader_kwargs=train_opts,
              valid_loader_kwargs=eval_opts)
    brain.results["epochs_trained"] = hparams["epoch_counter"].current  # before testing loads the best checkpoint
    brain.results["averaged"] = average_last_checkpoints(brain, hparams, datasets["valid"], eval_opts)
    if brain.nonfinite_total:
        logger.warning(f"{brain.nonfinite_total} training batches skipped (non-finite loss or input)")
    if "test" in datasets:
        brain.evaluate(datasets["test"], min_key="PER", test_loader_kwargs=eval_opts)
    if "_adapted" in finetune:
        brain.checkpointer.recover_if_possible(min_key="PER")  # the in-memory model = the checkpoint saved as best
        finetune.update(check_lora_reload(hparams, finetune, datasets))
    if not if_main_process():
        ddp_barrier()
        return 0
    metrics = write_reports(brain, hparams, counts, vocab, run_id, t0, resumed_epoch, _public(finetune))
    ddp_barrier()
    msg = f"best valid PER {metrics['best_valid_PER']:.2f}%" if metrics["best_valid_PER"] is not None else ""
    if metrics["test_PER"] is not None:
        msg += f", test PER {metrics['test_PER']:.2f}%"
        if metrics["test_PER_beam"] is not None:
            msg += f" (beam {metrics['test_PER_beam']:.2f}%)"
    print(f"{msg}; outputs in {hparams['output_folder']}")
    return 0


def _close_process_group() -> None:
    """DDP: leave the process group before the interpreter exits. Left to the interpreter's teardown, gloo's worker
    threads are sometimes destroyed while still joinable and a rank aborts ("terminate called without an active
    exception", SIGABRT) after a successful run."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    try:
        rc = main()
    finally:
        _close_process_group()
    sys.exit(rc)
