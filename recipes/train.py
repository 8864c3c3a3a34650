#!/usr/bin/env python3
"""Train the phoneme recognizer (CTC + location attention) whose posteriors/attention give Matcha durations.

    python recipes/train.py hparams/phoneme.yaml --data_folder DATA [--output_folder OUT] [--key value ...]

DATA holds ``train.csv valid.csv test.csv tokens.txt`` (data_prep/make_manifests.py). Every yaml key is a CLI
override; SpeechBrain run options work as usual (``--precision bf16``, ``--grad_accumulation_factor 4``,
``--max_grad_norm 5``, ``--ckpt_interval_minutes 5``, ``--device cuda:0``); ``torchrun --nproc_per_node=N`` runs
DDP (gloo without CUDA). A killed run resumes from its newest checkpoint (intra-epoch ones included) when started
again with the same ``--output_folder``. ``--overfit_one_batch True`` is the sanity mode (PER must reach 0);
``--pretrained_path RUN [--peft lora]`` fine-tunes (common/finetune.py).

The output folder is the run folder that decoding and the export read (common/run_folder.py): hyperparams.yaml,
tokens.txt, phonemes.json (+ phones.tsv), train_phonemes.txt, save/ (best by valid PER and latest); and the reports
train_log.txt, metrics.json, model_card.json, per_test.txt, a --metrics_csv row (common/run_report.py).
"""
from __future__ import annotations

import datetime
import io
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import ruamel.yaml  # noqa: E402
import speechbrain as sb  # noqa: E402
import torch  # noqa: E402
from hyperpyyaml import load_hyperpyyaml  # noqa: E402
from speechbrain.utils.distributed import (ddp_barrier, ddp_broadcast, if_main_process, infer_device,  # noqa: E402
                                          run_on_main)
from speechbrain.utils.logger import get_logger  # noqa: E402

from common import first_pass as A  # noqa: E402
from common import model as M  # noqa: E402
from common import run_folder  # noqa: E402
from common import styletts2 as S  # noqa: E402
from common import train_aids as AIDS  # noqa: E402
from common.audio import load_audio  # noqa: E402
from common.batching import device_overrides  # noqa: E402
from common.checkpoint import average_last_checkpoints  # noqa: E402
from common.ddp import LocalBatchNormDDP, close_process_group, exit_process, gloo_without_cuda, world_size  # noqa: E402
from common.finetune import check_finetune_args, setup_finetune  # noqa: E402
from common.frames import num_feature_frames  # noqa: E402
from common.io import UserError, cli, read_manifest, write_json  # noqa: E402
from common.nonfinite import SkipNonFiniteBatches  # noqa: E402
from common.run_report import check_metrics_csv, write_reports  # noqa: E402
from common.schedules import TrainClock, aligned_stop, batch_lr  # noqa: E402
from common.vocab import BOS_ID, EOS_ID, Vocab  # noqa: E402

logger = get_logger(__name__)


class PhonemeBrain(SkipNonFiniteBatches, LocalBatchNormDDP, sb.Brain):
    """CTC + attention phoneme recognizer; the forward pass itself lives in ``common.model``."""

    def on_fit_start(self):
        hp = self.hparams
        self.vocab = Vocab.load(hp.tokens_file)
        self.augment = not hp.overfit_one_batch
        self.freeze_norm_stats = str(hp.peft or "none").lower() == "lora"  # LoRA: the base keeps its statistics
        self.results = {"train_loss": [], "valid": [], "padding_ratio": [], "train_time": 0.0}
        self.pad = Counter()
        self.drift = A.BoundaryDrift()  # the valid rows' first-pass boundaries, one validation to the next
        self.clock = TrainClock()  # training seconds across resumes (the max_train_minutes budget, the cosine lr)
        self.checkpointer.add_recoverable("train_clock", self.clock, optional_load=True)
        self.loggers = [hp.train_logger]
        if hp.tensorboard:
            try:
                self.loggers.append(sb.utils.train_logger.TensorboardLogger(hp.tensorboard_folder))
            except ImportError:
                raise UserError("--tensorboard True needs the tensorboard package (pip install tensorboard)") from None
        for d in self.checkpointer.remove_incomplete():  # a save interrupted by a kill
            logger.info(f"removed incomplete checkpoint {d}")
        super().on_fit_start()  # compile, DDP, optimizers, resume from the newest checkpoint
        self.resumed_epoch = hp.epoch_counter.current
        if self.resumed_epoch:
            logger.info(f"resuming after epoch {self.resumed_epoch}")

    def _train_loader_specifics(self, dataset, loader_kwargs):
        loader_kwargs = super()._train_loader_specifics(dataset, loader_kwargs)
        if self.train_sampler is None and loader_kwargs.get("batch_sampler") is not None:
            self.train_sampler = loader_kwargs["batch_sampler"]  # fit() calls its set_epoch(): exact on resume
        return loader_kwargs

    def compute_forward(self, batch, stage):
        batch = batch.to(self.device)
        wavs, wav_lens = batch.sig
        tokens_bos, _ = batch.tokens_bos
        hp = self.hparams
        train = stage == sb.Stage.TRAIN and self.augment
        mixup = None
        if train:
            wavs, wav_lens = hp.wav_augment(wavs, wav_lens)
        warp = (lambda f: AIDS.vtlp(f, float(hp.vtlp_low), float(hp.vtlp_high))) if train and hp.vtlp else None
        feats = M.compute_feats(self.modules, hp, wavs, wav_lens, epoch=hp.epoch_counter.current, warp=warp)
        if train:  # SpeechBrain's SpecAugment (--spec_augment), then AuxiliaryASR's input aids
            feats, wav_lens, tokens_bos, mixup = AIDS.input_aids(hp, feats, wav_lens, tokens_bos)
        enc = M.encode(self.modules, feats, wav_lens)
        out = {"p_ctc": M.ctc_log_probs(self.modules, hp, enc), "wav_lens": wav_lens, "mixup": mixup}
        every = max(int(self.hparams.s2s_every), 1)
        if stage != sb.Stage.TRAIN or (self.step - 1) % every == 0:  # s2s_every: the decoder on every k-th batch
            out["p_seq"], out["attn"] = M.attention_decode(self.modules, hp, enc, wav_lens, tokens_bos)
        if stage == sb.Stage.TEST and self.searcher is not None:
            out["beam_hyps"] = self.searcher(enc, wav_lens)[0]
        return out

    def compute_objectives(self, out, batch, stage):
        hp = self.hparams
        tokens, tok_lens = batch.tokens
        tokens_eos, eos_lens = batch.tokens_eos
        p_ctc, wav_lens, attn = out["p_ctc"], out["wav_lens"], out.get("attn")
        train = stage == sb.Stage.TRAIN
        logp = AIDS.loss_logp(p_ctc, float(hp.ctc_blank_bias), float(hp.ctc_temperature)) if train else p_ctc
        mixup, lam = out.get("mixup"), 1.0
        loss_ctc = hp.ctc_cost(logp, tokens, wav_lens, tok_lens)
        if mixup is not None:  # the mixed rows' transcripts, weighted like their features
            perm, lam = mixup[0].to(tokens.device), mixup[1]
            loss_ctc = lam * loss_ctc + (1 - lam) * hp.ctc_cost(logp, tokens[perm], wav_lens, tok_lens[perm])
        loss = hp.ctc_weight * loss_ctc
        loss_seq = loss_ga = torch.zeros((), device=loss.device)
        if attn is not None:
            loss_seq = hp.seq_cost(out["p_seq"], tokens_eos, eos_lens)
            if mixup is not None:  # teacher-forced with the first row's transcript, scored against both
                loss_seq = lam * loss_seq + (1 - lam) * hp.seq_cost(out["p_seq"], tokens_eos[perm], eos_lens[perm])
            loss = loss + hp.s2s_weight * loss_seq
            epoch = hp.epoch_counter.current
            if hp.guided_attn_weight > 0 and (hp.guided_attn_epochs <= 0 or epoch <= hp.guided_attn_epochs):
                loss_ga = M.guided_attention_loss(attn, M.abs_lengths(eos_lens, attn.shape[1]),
                                                  M.abs_lengths(wav_lens, attn.shape[2]), hp.guided_attn_sigma)
                loss = loss + hp.guided_attn_weight * loss_ga
        if train:
            frames = M.abs_lengths(wav_lens, p_ctc.shape[1])
            aids = AIDS.loss_aids(hp, p_ctc.float(), frames, M.abs_lengths(tok_lens, tokens.shape[1]), attn,
                                  None if attn is None else M.abs_lengths(eos_lens, attn.shape[1]),
                                  hp.epoch_counter.current, self.optimizer_step)
            for value in aids.values():
                loss = loss + value
        if torch.isfinite(loss):
            if train:
                self.parts.update({name: float(value.detach()) for name, value in aids.items()})
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
            if stage == sb.Stage.VALID:
                self._track_selection(attn, hyps, tokens, tok_lens, eos_lens, wav_lens)
                if hp.track_align_shift:
                    self._track_drift(p_ctc, attn, tokens, tok_lens, wav_lens, batch.id)
            if "beam_hyps" in out:
                self.beam_metrics.append(batch.id, out["beam_hyps"], tokens, target_len=tok_lens,
                                         ind2lab=self.ids_to_tokens)
        return loss

    def ids_to_tokens(self, seqs):
        return [[self.vocab.tokens[int(i)] for i in s] for s in seqs]

    def _track_selection(self, attn, hyps, tokens, tok_lens, eos_lens, wav_lens):
        """Per valid row: the attention's diagonality and the CTC length gap (the ``best_joint`` score's terms)."""
        ref = M.abs_lengths(tok_lens, tokens.shape[1]).tolist()
        self.sel["gap"] += AIDS.length_gap([len(h) for h in hyps], ref)
        if attn is not None:
            self.sel["diag"] += AIDS.diagonality(attn.detach(), M.abs_lengths(eos_lens, attn.shape[1]),
                                                 M.abs_lengths(wav_lens, attn.shape[2]))

    def _selection(self, per: float) -> dict:
        """Mean diagonality and length gap of the valid rows, and the joint score (``checkpoint_selection``)."""
        hp, sel = self.hparams, self.sel

        def mean(xs):
            return sum(xs) / len(xs) if xs else None

        diag, gap = mean(sel["diag"]), mean(sel["gap"])
        joint = AIDS.joint_score(per, diag, gap, float(hp.joint_lambda_diag), float(hp.joint_lambda_length),
                                 float(hp.joint_target_length_diff))
        return {"diagonality": None if diag is None else round(diag, 4),
                "ctc_length_gap": None if gap is None else round(gap, 3), "joint": round(joint, 5)}

    def _track_drift(self, p_ctc, attn, tokens, tok_lens, wav_lens, row_ids):
        """The valid rows' first-pass boundaries (the export's default scores), for ``align_shift_ms``."""
        hp = self.hparams
        frame_lens = M.abs_lengths(wav_lens, p_ctc.shape[1]).tolist()
        ids = [tokens[k, :n].tolist() for k, n in enumerate(M.abs_lengths(tok_lens, tokens.shape[1]).tolist())]
        kind = "joint" if attn is not None else "ctc"
        with torch.no_grad():
            _, _, frames = A.align_batch(p_ctc.detach().float(), None if attn is None else attn.detach().float(),
                                         self.ids_to_tokens(ids), ids, frame_lens, kind, hp.align_shift_ctc_weight,
                                         hp.blank_index)
        hop_s = M.feature_hop_samples(hp) / float(hp.sample_rate)
        for rid, fr in zip(row_ids, frames):
            self.drift.add(rid, fr, hop_s)

    def on_fit_batch_start(self, batch, should_step):
        if self.freeze_norm_stats:
            for m in self.modules.modules():
                if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                    m.eval()
        wavs, lens = batch.sig
        n = wavs.shape[1]
        self.pad.update(total=n * wavs.shape[0], real=float((lens * n).round().sum()), batches=1, utts=wavs.shape[0])
        if should_step:
            try:
                per_epoch = len(self.train_sampler)
            except TypeError:
                per_epoch = self.results.get("batches_per_epoch", 0)
            lr = batch_lr(self.hparams, self.clock, self.hparams.epoch_counter.current, self.step, per_epoch,
                          self.optimizer_step, self.hparams.lr_annealing.hyperparam_value)
            if lr is not None:
                for group in self.optimizer.param_groups:
                    group["lr"] = lr

    def on_stage_start(self, stage, epoch=None):
        self.parts = Counter()
        self.stage_t0 = time.time()
        if stage == sb.Stage.TRAIN:
            self.pad = Counter()
            return
        self.ctc_metrics = self.hparams.ctc_stats()
        self.per_metrics = self.hparams.per_stats()
        self.beam_metrics = self.hparams.per_stats()
        self.searcher = None
        if stage == sb.Stage.VALID:
            self.drift.start()
            self.sel = {"diag": [], "gap": []}
        if stage == sb.Stage.TEST and self.hparams.test_beam_search:
            self.searcher = self.hparams.attention_searcher(self.hparams.modules, self.hparams, len(self.vocab))

    def _parts(self):
        n, n_dec = max(self.parts["n"], 1), max(self.parts["n_dec"], 1)
        parts = {"ctc": round(self.parts["ctc"] / n, 4), "seq": round(self.parts["seq"] / n_dec, 4),
                 "guided": round(self.parts["guided"] / n_dec, 4)}
        for name in AIDS.LOSS_AIDS:  # the loss aids switched on
            if name in self.parts:
                parts[name] = round(self.parts[name] / n, 4)
        return parts

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
            shift = self.drift.finish() if hp.track_align_shift else None
            if shift is not None:
                stats["align_shift_ms"] = shift
            sel = self._selection(per)
            stats.update({k: v for k, v in sel.items() if v is not None})
            res["valid"].append({"epoch": epoch, "loss": stage_loss, "PER": per, "lr": old_lr, "align_shift_ms": shift,
                                 **sel})
            res["valid_time"] = time.time() - self.stage_t0
            # kept: the best by valid PER, the best by the joint score (best_joint; export --checkpoint joint), the
            # latest (SpeechBrain keeps the most recent too) and, for average_last, the last K
            keys = ["PER", "joint"] if hp.keep_best_joint else ["PER"]
            ckpt_meta = {"PER": per, "joint": sel["joint"], "epoch": epoch}
            self.checkpointer.save_and_keep_only(meta={k: ckpt_meta[k] for k in [*keys, "epoch"]}, min_keys=keys,
                                                 num_to_keep=max(1, int(hp.average_last)))
            # logged only once its end-of-epoch checkpoint exists: a run killed in between would otherwise resume
            # from the epoch's last intra-epoch checkpoint, finish the epoch again and log it twice
            meta = {"epoch": epoch, "lr": old_lr, "nonfinite_skipped": self.nonfinite_total}
            for lg in self.loggers:
                lg.log_stats(stats_meta=meta, train_stats=self.train_stats, valid_stats=stats)
            budget, spent = float(hp.max_train_minutes) * 60, self.clock.elapsed()  # spent: resumes included
            # the next epoch would overrun the budget; under DDP every process follows rank 0's clock (ranks that
            # decided differently would wait for each other forever in the next epoch's collectives)
            if ddp_broadcast(budget > 0 and spent + spent / max(epoch, 1) > budget):
                logger.info(f"max_train_minutes={hp.max_train_minutes}: stopping after epoch {epoch} ({spent:.0f} s)")
                hp.epoch_counter.limit = epoch
            if ddp_broadcast(aligned_stop(res["valid"], hp, epoch)):
                logger.info(f"stop_align_shift_ms={hp.stop_align_shift_ms}: the first-pass boundaries moved less at "
                            f"{hp.stop_align_patience} validations in a row; stopping after epoch {epoch}")
                hp.epoch_counter.limit = epoch
            return
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


class StyleTTS2Brain(PhonemeBrain):
    """StyleTTS2's text aligner (``hparams/styletts2_asr.yaml``, ``common/styletts2.py``) fine-tuned by this recipe:
    only the forward pass and the losses differ, those of its own training (AuxiliaryASR: CTC + decoder
    cross-entropy; StyleTTS2's train_first.py: the monotonic attention loss). Batches: ``tokens`` = CTC targets,
    ``tokens_bos`` = its text input ``[0, ids..., 0]``."""

    def compute_forward(self, batch, stage):
        batch = batch.to(self.device)
        text, text_lens = batch.tokens_bos
        return S.train_forward(self.modules.asr, *batch.sig, text, M.abs_lengths(text_lens, text.shape[1]))

    def compute_objectives(self, out, batch, stage):
        hp = self.hparams
        tokens, tok_lens = batch.tokens
        T = out["ctc_logit"].shape[1]
        p_ctc, frame_lens = torch.log_softmax(out["ctc_logit"].float(), -1), out["frame_lens"].float() / T
        loss_ctc, loss_seq = hp.ctc_cost(p_ctc, tokens, frame_lens, tok_lens), S.seq_loss(out)
        loss_mono = S.mono_loss(out) if hp.mono_weight > 0 else torch.zeros((), device=p_ctc.device)
        loss = hp.ctc_weight * loss_ctc + hp.s2s_weight * loss_seq + hp.mono_weight * loss_mono
        if torch.isfinite(loss):
            self.parts.update(ctc=float(loss_ctc.detach()), seq=float(loss_seq.detach()),
                              guided=float(loss_mono.detach()), n=1, n_dec=1)
        if stage != sb.Stage.TRAIN:
            self.ctc_metrics.append(batch.id, p_ctc, tokens, frame_lens, tok_lens)
            from speechbrain.decoders import ctc_greedy_decode

            hyps = ctc_greedy_decode(p_ctc, frame_lens, blank_id=hp.blank_index)
            self.per_metrics.append(batch.id, hyps, tokens, target_len=tok_lens, ind2lab=self.ids_to_tokens)
        return loss

    def ids_to_tokens(self, seqs):
        tokens = self.hparams.styletts2.vocab().tokens
        return [[tokens[int(i)] for i in s] for s in seqs]


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
    hop = M.feature_hop_samples(hparams)
    styletts2 = hparams.get("model_family") == "styletts2"
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
        samples = int(dur * hparams["sample_rate"] / speed)
        frames = S.num_frames(samples) if styletts2 else num_feature_frames(samples, hop)
        need = M.ctc_min_frames(S.ctc_targets(ids, hparams["blank_index"]) if styletts2 else ids)
        if styletts2:  # its monotonic loss aligns every token of [0, ids..., 0] to a frame of its own
            need = max(need, len(ids) + 2)
        if frames < need:
            counts[f"{split}_ctc_infeasible"] += 1
            logger.warning(f"{where}: {frames} frames < {need} needed by CTC; skipped")
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

    @sb.utils.data_pipeline.takes("token_ids")
    @sb.utils.data_pipeline.provides("tokens", "tokens_bos", "tokens_eos")
    def styletts2_token_pipeline(ids):  # CTC targets; StyleTTS2's text input [0, ids..., 0] (also the s2s targets)
        yield torch.LongTensor(S.ctc_targets(ids, hparams["blank_index"]))
        text = torch.LongTensor([S.PAD_ID] + ids + [S.PAD_ID])
        yield text
        yield text

    dsets = list(datasets.values())
    sb.dataio.dataset.add_dynamic_item(dsets, audio_pipeline)
    sb.dataio.dataset.add_dynamic_item(
        dsets, styletts2_token_pipeline if hparams.get("model_family") == "styletts2" else token_pipeline)
    sb.dataio.dataset.set_output_keys(dsets, ["id", "sig", "tokens", "tokens_bos", "tokens_eos"])
    for s in ("valid", "test"):
        if s in datasets:
            datasets[s] = datasets[s].filtered_sorted(sort_key="duration")
    sampler = None
    if hparams["dynamic_batching"] and not hparams["overfit_one_batch"]:
        sampler = sb.dataio.sampler.DynamicBatchSampler(datasets["train"], length_func=lambda x: x["duration"],
                                                        seed=int(hparams["seed"]), **hparams["dynamic_batch_sampler"])
    return datasets, sampler, counts


def load_hparams(hparams_file, overrides):
    try:
        with open(hparams_file, encoding="utf-8") as fin:
            return load_hyperpyyaml(fin, overrides)
    except FileNotFoundError as err:
        raise UserError(f"cannot load hparams: {err}") from None


@cli
def main(argv=None) -> int:
    hparams_file, run_opts, overrides = sb.parse_arguments(sys.argv[1:] if argv is None else argv)
    hparams = load_hparams(hparams_file, overrides)
    styletts2 = hparams.get("model_family") == "styletts2"
    # settings derived here become overrides, so the run folder's hyperparams.yaml holds plain values (its saved copy
    # resolves every reference: an !apply over the manifests' tokens.txt would tie the run to the manifests):
    # the vocabulary size, and the batch for this device (common/batching.py: bigger batches and a scaled lr on CUDA)
    given = (ruamel.yaml.YAML(typ="safe").load(overrides) if overrides else None) or {}
    device = str(run_opts["device"] or infer_device())
    extra = device_overrides(hparams, device, given, sum(float(r["duration"]) for r in read_manifest(
        hparams["train_csv"])) if device.startswith("cuda") else 0.0)
    if extra:
        logger.info(f"batch for this device: {extra}")
    if not styletts2:
        extra.setdefault("output_neurons", given.get("output_neurons", len(Vocab.load(hparams["tokens_file"]))))
    stream = io.StringIO()
    ruamel.yaml.YAML(typ="safe").dump({**given, **extra}, stream)
    overrides = stream.getvalue()
    hparams = load_hparams(hparams_file, overrides)
    if hparams["overfit_one_batch"] and run_opts["debug"]:
        raise UserError("--overfit_one_batch and SpeechBrain's --debug are different modes; pick one")
    check_metrics_csv(hparams["metrics_csv"])
    if int(hparams["num_threads"]) > 0:
        torch.set_num_threads(int(hparams["num_threads"]))
    if styletts2:  # StyleTTS2's symbol table + the corpus' new symbols (common/styletts2.py)
        vocab = hparams["styletts2"].vocab()
        if hparams["save_styletts2"] and Path(hparams["save_styletts2"]).is_dir():
            raise UserError(f"--save_styletts2 {hparams['save_styletts2']} is a folder; give the .pth file to write")
    else:
        vocab = Vocab.load(hparams["tokens_file"])
        if hparams["output_neurons"] != len(vocab):
            raise UserError(f"output_neurons={hparams['output_neurons']} but {hparams['tokens_file']} has "
                            f"{len(vocab)}")
    run_opts = gloo_without_cuda(run_opts)
    pretrained_ckpt = check_finetune_args(hparams, vocab)
    sb.utils.distributed.ddp_init_group(run_opts)
    run_on_main(run_folder.prepare, args=[hparams_file, overrides, hparams])
    if styletts2:  # the vocabulary mapping, with the run (the export and the write-back read it)
        run_on_main(write_json, args=[Path(hparams["output_folder"]) / S.RUN_FILE, hparams["styletts2"].record()])
    finetune = setup_finetune(hparams, pretrained_ckpt, run_on_main)
    run_id = hparams["run_id"] or datetime.datetime.now().strftime("%Y%m%d_%H%M%S")

    datasets, sampler, counts = dataio_prepare(hparams, vocab)
    hparams["train_logger"].log_stats(stats_meta={"data": " ".join(f"{k}={v}" for k, v in sorted(counts.items()))})
    logger.info(f"data: {dict(counts)}")
    if hparams["overfit_one_batch"]:
        hparams["epoch_counter"].limit = int(hparams["overfit_epochs"])
        train_opts = {**hparams["train_dataloader_opts"], "batch_size": int(hparams["overfit_batch_size"]),
                      "shuffle": False}
    elif sampler is not None:  # Brain calls its set_epoch(): new shuffles each epoch, exact on resume
        train_opts = {"batch_sampler": sampler, "num_workers": int(hparams["num_workers"])}
    else:
        train_opts = hparams["train_dataloader_opts"]
    brain_class = StyleTTS2Brain if styletts2 else PhonemeBrain
    brain = brain_class(modules=hparams["modules"], opt_class=hparams["opt_class"], hparams=hparams,
                        run_opts=run_opts, checkpointer=hparams["checkpointer"])

    t0 = time.time()
    brain.fit(hparams["epoch_counter"], datasets["train"], datasets["valid"], train_loader_kwargs=train_opts,
              valid_loader_kwargs=hparams["valid_dataloader_opts"])
    brain.results["epochs_trained"] = hparams["epoch_counter"].current  # before testing loads the best checkpoint
    k = int(hparams["average_last"])
    if k >= 2 and not finetune.lora and world_size() == 1 and not hparams["overfit_one_batch"]:
        brain.results["averaged"] = average_last_checkpoints(brain, k, datasets["valid"],
                                                             hparams["valid_dataloader_opts"])
    if brain.nonfinite_total:
        logger.warning(f"{brain.nonfinite_total} training batches skipped (non-finite loss or input)")
    if "test" in datasets:
        brain.evaluate(datasets["test"], min_key="PER", test_loader_kwargs=hparams["test_dataloader_opts"])
    if finetune.lora:
        brain.checkpointer.recover_if_possible(min_key="PER")  # the in-memory model = the checkpoint saved as best
        valid = datasets["valid"]
        finetune.check_reload(hparams, *M.batch_wavs([valid[i]["sig"] for i in range(min(3, len(valid)))]),
                              ctc_fn=S.ctc_log_probs if styletts2 else None)
    if not if_main_process():
        ddp_barrier()
        return 0
    languages = [d["language"] for d in datasets["train"].data.values() if d.get("language")]
    metrics = write_reports(brain, hparams, counts, vocab, run_id, time.time() - t0, brain.resumed_epoch,
                            finetune.info, languages, world_size())
    if styletts2 and hparams["save_styletts2"]:
        out = S.write_back(hparams["output_folder"], hparams["save_styletts2"], epochs=metrics["epochs"])
        logger.info(f"wrote {out} (+ {out.parent / S.CONFIG_FILE}) in StyleTTS2's format")
    ddp_barrier()
    msg = f"best valid PER {metrics['best_valid_PER']:.2f}%" if metrics["best_valid_PER"] is not None else ""
    if metrics["test_PER"] is not None:
        msg += f", test PER {metrics['test_PER']:.2f}%"
        if metrics["test_PER_beam"] is not None:
            msg += f" (beam {metrics['test_PER_beam']:.2f}%)"
    print(f"{msg}; outputs in {hparams['output_folder']}")
    return 0


if __name__ == "__main__":
    try:
        rc = main()
    finally:
        close_process_group()
    exit_process(rc)
