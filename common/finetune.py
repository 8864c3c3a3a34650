"""Fine-tuning: start a run from a trained model (``--pretrained_path``), optionally training LoRA adapters on it
(``--peft lora``), and read such runs back.

- ``check_finetune_args`` validates the options (before anything is written) and finds the pretrained checkpoint;
- ``setup_finetune`` loads it (SpeechBrain ``Pretrainer``) and, for LoRA, freezes the model and wraps its Linear
  (and with ``lora_conv`` Conv) layers in ``LoRAWithDropout`` adapters (``speechbrain.nnet.adapters``); the
  checkpointer then saves the adapters (``lora.ckpt``) and, with ``save_full_model``, the merged weights
  (``model.ckpt``, ``MergedLoRAModel``);
- ``FineTuning.check_reload`` reloads the finished run like the export will and compares it with the in-memory model;
- ``load_lora_run`` rebuilds an adapters-only run (base weights named in ``lora.json`` + adapters).
"""
from __future__ import annotations

import copy
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
from speechbrain.nnet.adapters import AdaptedModel, LoRA, replace_module
from speechbrain.utils.checkpoints import mark_as_loader, mark_as_saver, register_checkpoint_hooks

from common.io import UserError, write_json
from common.run_folder import LORA_FILE, TOKENS_FILE
from common.vocab import Vocab

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------------------------
# LoRA adapters
# --------------------------------------------------------------------------------------------------------------------
class LoRAWithDropout(LoRA):
    """SpeechBrain's ``LoRA`` (``W x + (alpha / r) * B A x``, ``B`` zero-initialised) with dropout on the adapter
    input, as in the LoRA paper / HF peft (``lora_dropout``)."""

    def __init__(self, target_module, rank: int = 16, alpha: float = 1.0, dropout: float = 0.0):
        super().__init__(target_module, rank=rank, alpha=alpha)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pretrained_module(x) + self.adapter_up_proj(self.adapter_down_proj(self.dropout(x))) * self.scaling

    def merged(self) -> nn.Module:
        """A copy of the wrapped layer with ``(alpha / r) * B A`` folded into its weight (same output in eval)."""
        base = copy.deepcopy(self.pretrained_module)
        down, up = self.adapter_down_proj.weight.double(), self.adapter_up_proj.weight.double()
        if isinstance(base, nn.Linear):
            delta = up @ down
        else:
            # Conv: down mirrors the layer's kernel, up is pointwise
            # -> delta[o, i, k...] = sum_r up[o, r] down[r, i, k...]
            delta = torch.einsum("or,r...->o...", up.flatten(1), down)
        with torch.no_grad():  # in float64, rounded once
            base.weight.copy_((base.weight.double() + delta * self.scaling).to(base.weight.dtype))
        for p in base.parameters():
            p.requires_grad_(True)
        return base


def add_lora(model: nn.Module, rank: int, alpha: float, dropout: float = 0.0, conv: bool = False) -> AdaptedModel:
    """Freeze ``model`` and wrap its ``nn.Linear`` layers (and ``Conv1d/2d/3d`` when ``conv``) in place with LoRA
    adapters (``speechbrain.nnet.adapters.AdaptedModel``); ``.replace_layers`` lists the adapted layers. The
    returned object is the checkpoint recoverable: its saver writes the adapter weights only."""
    if int(rank) < 1:
        raise UserError(f"--lora_r must be >= 1, got {rank}")
    if not 0 <= float(dropout) < 1:
        raise UserError(f"--lora_dropout must be in [0, 1), got {dropout}")
    adapted = AdaptedModel(model_to_adapt=model, adapter_class=LoRAWithDropout, all_linear=True, all_conv=bool(conv),
                           adapter_kwargs={"rank": int(rank), "alpha": float(alpha), "dropout": float(dropout)})
    if not adapted.replace_layers:
        raise UserError("LoRA found no layer to adapt in the model")
    return adapted


def merge_lora(adapted: AdaptedModel) -> nn.Module:
    """A plain copy of the adapted model with every adapter folded into its layer's weight (state_dict keys as the
    model without LoRA, so ``load_for_inference`` reads it like any other run)."""
    model = copy.deepcopy(adapted.adapted_model)
    for name in adapted.replace_layers:
        replace_module(model, name, model.get_submodule(name).merged())
    return model


def lora_state(adapted: AdaptedModel) -> dict:
    """The adapter weights only (what ``AdaptedModel``'s checkpoint saver writes)."""
    return {k: v.detach().clone() for k, v in adapted.state_dict(keep_vars=True).items() if v.requires_grad}


def load_lora_state(adapted: AdaptedModel, path) -> None:
    """Load adapter weights; unlike ``AdaptedModel.loader`` (strict=False) every adapter must be in the file."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    want = set(lora_state(adapted))
    if set(state) != want:
        missing, extra = sorted(want - set(state))[:3], sorted(set(state) - want)[:3]
        raise UserError(f"{path}: LoRA adapters do not match the model (missing {missing}, unexpected {extra}); "
                        f"same --lora_r/--lora_conv and model sizes as the run that wrote it?")
    adapted.load_state_dict(state, strict=False)


# --------------------------------------------------------------------------------------------------------------------
# Pretrained checkpoints
# --------------------------------------------------------------------------------------------------------------------
def find_pretrained_checkpoint(path) -> Path:
    """``--pretrained_path``: an output_folder (its best valid-PER checkpoint in ``save/``) or one ``CKPT+...``
    folder -> the checkpoint folder holding ``model.ckpt``."""
    from speechbrain.utils.checkpoints import Checkpointer

    path = Path(path)
    if (path / "model.ckpt").is_file() or (path / "lora.ckpt").is_file():
        ckpt = path
    elif (path / "save").is_dir() or any(path.glob("CKPT+*")):
        save = path / "save" if (path / "save").is_dir() else path
        found = Checkpointer(save).find_checkpoint(min_key="PER") or Checkpointer(save).find_checkpoint()
        if found is None:
            raise UserError(f"--pretrained_path {path}: no checkpoint in {save}")
        ckpt = Path(found.path)
    else:
        raise UserError(f"--pretrained_path {path}: neither an output_folder of recipes/train.py (with save/) nor a "
                        f"checkpoint folder (save/CKPT+... with model.ckpt)")
    if not (ckpt / "model.ckpt").is_file():
        raise UserError(f"--pretrained_path {path}: {ckpt} holds LoRA adapters only (trained with --save_full_model "
                        f"False); fine-tune from a run saved with full weights (--save_full_model True)")
    return ckpt.resolve()


def pretrained_tokens_file(ckpt: Path) -> Path | None:
    """tokens.txt of the run a checkpoint folder belongs to (``<output_folder>/save/CKPT+.../``)."""
    for d in (ckpt, ckpt.parent, ckpt.parent.parent):
        if (d / TOKENS_FILE).is_file():
            return d / TOKENS_FILE
    return None


def check_pretrained(ckpt: Path, model: nn.Module, vocab: Vocab, where: str) -> None:
    """Vocabulary and parameter shapes of a pretrained checkpoint must match the model (UserError otherwise)."""
    tok = pretrained_tokens_file(ckpt)
    if tok is not None:
        theirs = Vocab.load(tok).tokens
        if theirs != vocab.tokens:
            diff = next((i for i, (a, b) in enumerate(zip(theirs, vocab.tokens)) if a != b),
                        min(len(theirs), len(vocab.tokens)))
            a = theirs[diff] if diff < len(theirs) else None
            b = vocab.tokens[diff] if diff < len(vocab.tokens) else None
            raise UserError(f"--pretrained_path {where}: vocabulary differs from this corpus ({len(theirs)} vs "
                            f"{len(vocab.tokens)} tokens, first difference at id {diff}: {a!r} vs {b!r}); fine-tune "
                            f"with the pretrained {tok} (copy it into --data_folder) or train from scratch")
    state = torch.load(ckpt / "model.ckpt", map_location="cpu", weights_only=True)
    ours = model.state_dict()
    bad = [k for k in ours if k not in state or tuple(state[k].shape) != tuple(ours[k].shape)]
    bad += [k for k in state if k not in ours]
    if bad:
        k = bad[0]
        detail = (f"{k}: {tuple(state[k].shape) if k in state else 'missing'} vs "
                  f"{tuple(ours[k].shape) if k in ours else 'missing'}")
        raise UserError(f"--pretrained_path {where}: its model does not match these hparams ({len(bad)} tensors "
                        f"differ, e.g. {detail}); use the same model sizes as the pretrained run")



def load_lora_run(model_dir: Path, hparams, ckpter, ckpt) -> None:
    """Adapters-only run (``--save_full_model False``): base weights from the checkpoint named in ``lora.json``,
    LoRA wrapped around them as in training, adapters from ``lora.ckpt``, the rest (normalization) from ``ckpt``."""
    info_file = model_dir / LORA_FILE
    if not info_file.is_file():
        raise UserError(f"{ckpt.path} holds LoRA adapters only but {info_file} "
                        "(the pointer to the base model) is missing")
    info = json.loads(info_file.read_text(encoding="utf-8"))
    base = Path(info["base_checkpoint"])
    if not (base / "model.ckpt").is_file():
        raise UserError(f"{model_dir}: base model {base}/model.ckpt of these LoRA adapters not found (moved or "
                        f"deleted?); put it back or edit base_checkpoint in {info_file}")
    model = hparams["model"]
    model.load_state_dict(torch.load(base / "model.ckpt", map_location="cpu", weights_only=True))
    adapted = add_lora(model, info["lora_r"], info["lora_alpha"], info["lora_dropout"], info.get("lora_conv", False))
    if hparams.get("model_family") == "styletts2":  # the rows of added symbols trained beside the adapters
        from common.styletts2 import train_new_rows

        train_new_rows(model, hparams["styletts2"].n_base)
    load_lora_state(adapted, ckpt.paramfiles["lora"])
    del ckpter.recoverables["model"]
    ckpter.load_checkpoint(ckpt)


# --------------------------------------------------------------------------------------------------------------------
# The recipe's fine-tuning setup
# --------------------------------------------------------------------------------------------------------------------
@register_checkpoint_hooks
class MergedLoRAModel:
    """Checkpoint recoverable ``model`` of a LoRA run with ``--save_full_model True``: writes the adapters folded into
    the base weights (a plain ``model.ckpt``). Loading it is a no-op: on resume the base comes from
    ``--pretrained_path`` and the adapters from ``lora.ckpt``."""

    def __init__(self, adapted):
        self.adapted = adapted

    @mark_as_saver
    def _save(self, path):
        torch.save(merge_lora(self.adapted).state_dict(), path)

    @mark_as_loader
    def _load(self, path, end_of_epoch):
        del path, end_of_epoch


@dataclass
class FineTuning:
    """What ``setup_finetune`` did: ``info`` (recorded in metrics.json / the model card), the LoRA-adapted model
    and its starting weights (None for plain fine-tuning or training from scratch)."""
    info: dict
    adapted: AdaptedModel | None = None
    start: dict = field(default_factory=dict)

    @property
    def lora(self) -> bool:
        return self.adapted is not None

    def check_reload(self, hparams, wavs: torch.Tensor, wav_lens: torch.Tensor, ctc_fn=None) -> dict:
        """Reload the saved run with ``load_for_inference`` and compare its CTC log-probs with the in-memory model
        (the best checkpoint loaded) on ``wavs``; also how much the frozen base and the adapters moved from their
        starting values. The result is added to ``info``. ``ctc_fn(modules, hparams, wavs, wav_lens)``: the CTC
        log-probs of another model family (default: our recognizer's)."""
        from common import model as M

        if ctc_fn is None:
            def ctc_fn(mods, hp, w, lens):
                return M.ctc_log_probs(mods, hp, M.encode(mods, M.compute_feats(mods, hp, w, lens), lens))
        mods = dict(hparams["modules"].items())
        was = {k: m.training for k, m in mods.items()}
        with torch.no_grad():
            for m in mods.values():
                m.eval()
            ref = ctc_fn(mods, hparams, wavs, wav_lens)
            for k, m in mods.items():
                m.train(was[k])
            re_mods, re_hp, _ = M.load_for_inference(hparams["output_folder"])
            got = ctc_fn(re_mods, re_hp, wavs, wav_lens)
        diff = float((ref - got).abs().max())
        ok = bool(torch.allclose(got, ref, atol=1e-5, rtol=1e-6))  # merging re-rounds: a few ulps at log p ~ -20
        now = {k: v.detach() for k, v in self.adapted.state_dict(keep_vars=True).items()}
        new_rows = set(self.info.get("trained_new_rows") or [])  # StyleTTS2: rows of added symbols, trained too
        moved = {k: float((now[k] - v).abs().max()) for k, v in self.start.items()
                 if k.split("adapted_model.", 1)[-1] not in new_rows}
        (logger.info if ok else logger.warning)(
            f"LoRA reload check: max |CTC log-prob difference| saved vs in-memory = {diff:.2e}{'' if ok else ' (!)'}")
        self.info.update(reload_max_abs_diff=diff, reload_ok=ok,
                         base_max_abs_change=max((v for k, v in moved.items() if "adapter_" not in k), default=0.0),
                         adapter_max_abs_change=max((v for k, v in moved.items() if "adapter_" in k), default=0.0))
        return self.info


def _save_state(model: nn.Module, path: Path) -> None:
    from common.io import atomic_path

    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        torch.save(model.state_dict(), tmp)


def check_finetune_args(hparams, vocab: Vocab):
    """Validate --peft/--pretrained_path before anything is written; returns the pretrained checkpoint folder."""
    peft = str(hparams["peft"] or "none").lower()
    if peft not in ("none", "lora"):
        raise UserError(f"--peft must be none or lora, got {hparams['peft']!r}")
    if peft == "lora" and not hparams["pretrained_path"]:
        raise UserError("--peft lora adapts a trained model: give it with --pretrained_path (an earlier output_folder)")
    if hparams.get("model_family") == "styletts2":  # a StyleTTS2 ASR checkpoint (epoch_00080.pth)
        from common import styletts2

        return styletts2.check_pretrained(hparams)
    if not hparams["pretrained_path"]:
        return None
    ckpt = find_pretrained_checkpoint(hparams["pretrained_path"])
    check_pretrained(ckpt, hparams["model"], vocab, hparams["pretrained_path"])
    return ckpt


def setup_finetune(hparams, ckpt, run_on_main) -> FineTuning:
    """``--pretrained_path``: load its model + normalization (SpeechBrain Pretrainer). ``--peft lora``: freeze the
    model and wrap its layers in LoRA adapters; the checkpointer then saves ``lora.ckpt`` (adapters) and, with
    ``--save_full_model True``, ``model.ckpt`` (merged weights); ``lora.json`` records the base checkpoint."""
    from speechbrain.utils.parameter_transfer import Pretrainer

    peft = str(hparams["peft"] or "none").lower()
    info = {"peft": peft, "pretrained_path": hparams["pretrained_path"], "base_checkpoint": None}
    styletts2 = hparams.get("model_family") == "styletts2"
    if styletts2:  # its checkpoint, with rows for the symbols it lacks; LoRA's base: that model, in the run folder
        from common import styletts2 as S

        S.load_pretrained(hparams, ckpt)
        info.update(base_checkpoint=str(ckpt), added_symbols=hparams["styletts2"].added)
        if peft == "lora":
            base = Path(hparams["output_folder"]) / "pretrained"
            run_on_main(_save_state, args=[hparams["model"], base / "model.ckpt"])
            info["base_checkpoint"] = str(base.resolve())
        logger.info(f"initialised the model from {ckpt} ({len(info['added_symbols'])} symbols added)")
    elif ckpt is not None:
        loadables = {"model": hparams["model"], "normalize": hparams["normalize"]}
        paths = {k: str(ckpt / f"{k}.ckpt") for k in loadables if (ckpt / f"{k}.ckpt").is_file()}
        pretrainer = Pretrainer(collect_in=Path(hparams["output_folder"]) / "pretrained",
                                loadables={k: loadables[k] for k in paths}, paths=paths)
        run_on_main(pretrainer.collect_files)
        pretrainer.load_collected()
        info["base_checkpoint"] = str(ckpt)
        logger.info(f"initialised {', '.join(paths)} from {ckpt}")
    if peft != "lora":
        return FineTuning(info)
    adapted = add_lora(hparams["model"], hparams["lora_r"], hparams["lora_alpha"], hparams["lora_dropout"],
                       hparams["lora_conv"])
    if "normalize" in hparams:
        hparams["normalize"].update_until_epoch = 0  # the base model's feature statistics stay as they were
    new_rows = S.train_new_rows(hparams["model"], hparams["styletts2"].n_base) if styletts2 else []
    ckpter = hparams["checkpointer"]
    del ckpter.recoverables["model"]
    ckpter.add_recoverable("lora", adapted)
    if hparams["save_full_model"]:
        ckpter.add_recoverable("model", MergedLoRAModel(adapted))
    names = {str(i): k for i, m in enumerate(hparams["model"]) for k, v in hparams["modules"].items() if v is m} \
        if isinstance(hparams["model"], nn.ModuleList) else {}
    layers = [".".join([names.get(n.split(".")[0], n.split(".")[0])] + n.split(".")[1:])
              for n in adapted.replace_layers]
    n_train = sum(p.numel() for p in adapted.parameters() if p.requires_grad)
    n_all = sum(p.numel() for p in adapted.parameters())
    info.update(lora_r=int(hparams["lora_r"]), lora_alpha=float(hparams["lora_alpha"]),
                lora_dropout=float(hparams["lora_dropout"]), lora_conv=bool(hparams["lora_conv"]),
                lora_layers=layers, save_full_model=bool(hparams["save_full_model"]),
                trainable_params=n_train, total_params=n_all, **({"trained_new_rows": new_rows} if styletts2 else {}))
    logger.info(f"LoRA r={info['lora_r']} alpha={info['lora_alpha']} dropout={info['lora_dropout']} on "
                f"{len(layers)} layers: {', '.join(layers)}; {n_train} of {n_all} parameters trainable; saving "
                f"{'merged full weights + adapters' if info['save_full_model'] else 'adapters only'}")
    hparams["train_logger"].log_stats(stats_meta={"lora_layers": " ".join(layers)})
    run_on_main(write_json, args=[Path(hparams["output_folder"]) / LORA_FILE, dict(info)])
    start = {k: v.detach().clone() for k, v in adapted.state_dict().items()}
    return FineTuning(info, adapted, start)
