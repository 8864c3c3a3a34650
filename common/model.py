"""Model parts of the phoneme recognizer (CTC + location-attention decoder) and the inference API.

The recognizer is declared in ``hparams/phoneme.yaml`` (every module sits in the yaml ``modules`` dict):

    wav (16 kHz) -> compute_features (80-dim Fbank, 10 ms hop) -> normalize (global InputNormalization)
        -> enc (ConvRNNEncoder: one output frame per feature frame) -> ctc_lin -> log_softmax   (CTC, blank 0)
                                                                  -> emb/dec/seq_lin          (attention, bos/eos)

The encoder keeps the feature rate (10 ms per frame) so phone boundaries can be read from its frames: it may run its
recurrent layers at a lower rate internally, but it upsamples back and mixes in the full-rate convolutional features.

Inference API (used by export / decode scripts)::

    modules, hparams, vocab = load_for_inference(model_dir, device="cpu")
    out = forward_scores(modules, hparams, wavs, wav_lens, tokens_bos, token_lens)
    out["ctc_logp"]   # [B, T, V] CTC log-posteriors, T = feature frames (10 ms)
    out["attn"]       # [B, U+1, T] attention of the decoder (teacher-forced with tokens_bos)
    out["enc_lens"]   # [B] valid frames per utterance (long)

``wavs`` are 16 kHz float waveforms ``[B, N]`` (use ``load_wav`` to read any file at the model's rate) and
``wav_lens`` relative lengths in (0, 1] as SpeechBrain pads them; ``tokens_bos`` are ``[B, U+1]`` ids from
``Vocab.encode`` with ``vocab.BOS_ID`` prepended (``token_lens`` relative lengths of that tensor).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import torch
import torch.nn as nn

from common.frames import hop_samples
from common.io import UserError
from common.run_folder import HPARAMS_FILE, TOKENS_FILE
from common.vocab import BLANK_ID, BOS_ID, Vocab


# --------------------------------------------------------------------------------------------------------------------
# Vocabulary helpers (yaml: ``output_neurons: !apply:common.model.vocab_size [<tokens_file>]``)
# --------------------------------------------------------------------------------------------------------------------
def vocab_size(tokens_file: str) -> int:
    """Number of model tokens (specials included) in ``tokens.txt``."""
    return len(Vocab.load(tokens_file))


def blank_prior(linear, blank_index: int, prob: float):
    """``linear`` (the CTC output layer, a SpeechBrain ``Linear``) with its blank bias raised so that, while the other
    logits are still near 0, blank starts at probability ``prob`` on every frame (0 = leave the random init).

    CTC's first phase is always blank-dominant; starting there spares the first steps' detour (yaml
    ``ctc_blank_prior``). The weights a run loads afterwards (checkpoint, ``--pretrained_path``) replace this."""
    prob = float(prob)
    if not 0.0 <= prob < 1.0:
        raise UserError(f"ctc_blank_prior={prob}: give a probability in [0, 1), e.g. --ctc_blank_prior 0.8 (0 = off)")
    if prob > 0:
        layer = linear.w
        others = layer.out_features - 1
        with torch.no_grad():
            layer.bias[blank_index] += math.log(others * prob / (1.0 - prob))
    return linear


# --------------------------------------------------------------------------------------------------------------------
# Frame arithmetic
# --------------------------------------------------------------------------------------------------------------------
def feature_hop_samples(hparams) -> int:
    """Samples per feature frame of the recognizer (``sample_rate`` x ``hop_length`` ms of its yaml)."""
    return hop_samples(int(_hp(hparams, "sample_rate")), float(_hp(hparams, "hop_length")))


def ctc_min_frames(token_ids: list[int]) -> int:
    """Fewest frames a CTC path needs for ``token_ids``: one per token plus a blank between equal neighbours."""
    repeats = sum(1 for a, b in zip(token_ids, token_ids[1:]) if a == b)
    return len(token_ids) + repeats


def abs_lengths(rel_lens: torch.Tensor, max_len: int) -> torch.Tensor:
    """Relative lengths (SpeechBrain padding convention) -> absolute lengths, rounded like its losses do."""
    return torch.round(rel_lens * max_len).long().clamp(min=1, max=max_len)


# --------------------------------------------------------------------------------------------------------------------
# Encoder
# --------------------------------------------------------------------------------------------------------------------
class ConvRNNEncoder(nn.Module):
    """Conv front-end at the feature rate, bidirectional RNN at ``rate / subsample``, back to the feature rate.

    Output frame ``t`` corresponds to input feature frame ``t`` (no net downsampling). With ``subsample > 1`` the
    RNN output is repeated ``subsample`` times, concatenated with the full-rate conv features (skip connection)
    and mixed by a kernel-3 convolution, so boundaries keep 10 ms resolution.

    Arguments
    ---------
    input_size: feature dimension (80 for the default Fbank).
    conv_channels, conv_layers, kernel_size: the 1-D conv front-end (conv -> norm -> GELU -> dropout).
    conv_norm: ``layer`` (LayerNorm over channels) or ``batch`` (BatchNorm1d; leaves the CTC blank plateau sooner
        and converges faster on small corpora).
    subsample: RNN frame-rate reduction (1 = none; 2 halves the RNN cost).
    rnn_type: ``lstm`` or ``gru``; rnn_layers, rnn_neurons: per direction.
    output_size: encoder output dimension (``enc_dim`` of the decoder, input of ``ctc_lin``).
    mix_kernel: kernel of the output convolution that mixes RNN and conv features (odd; 1 = per frame, cheapest).
    """

    def __init__(
        self,
        input_size: int = 80,
        conv_channels: int = 256,
        conv_layers: int = 2,
        kernel_size: int = 5,
        subsample: int = 2,
        rnn_type: str = "lstm",
        rnn_layers: int = 2,
        rnn_neurons: int = 256,
        output_size: int = 256,
        dropout: float = 0.15,
        conv_norm: str = "layer",
        mix_kernel: int = 3,
    ):
        super().__init__()
        if subsample < 1:
            raise ValueError("subsample must be >= 1")
        if mix_kernel < 1 or mix_kernel % 2 == 0:
            raise ValueError("mix_kernel must be odd (output frame t stays centred on input frame t)")
        if conv_norm not in ("layer", "batch"):
            raise ValueError(f"conv_norm must be 'layer' or 'batch', got {conv_norm!r}")
        self.subsample = subsample
        self.conv_norm = conv_norm
        convs, norms = [], []
        ch = input_size
        for _ in range(conv_layers):
            convs.append(nn.Conv1d(ch, conv_channels, kernel_size, padding=kernel_size // 2))
            norms.append(nn.LayerNorm(conv_channels) if conv_norm == "layer" else nn.BatchNorm1d(conv_channels))
            ch = conv_channels
        self.convs, self.norms = nn.ModuleList(convs), nn.ModuleList(norms)
        self.act = nn.GELU()
        self.drop = nn.Dropout(dropout)
        self.down = nn.Conv1d(ch, ch, subsample, stride=subsample) if subsample > 1 else None
        rnn_cls = {"lstm": nn.LSTM, "gru": nn.GRU}[rnn_type.lower()]
        # Bidirectional layers as forward/backward pairs of unidirectional RNNs: the backward one reads each
        # utterance reversed within its own length, so padding never leaks in and the fused CPU/GPU kernels are
        # used (packed sequences are ~5x slower on CPU).
        self.fwd, self.bwd = nn.ModuleList(), nn.ModuleList()
        for i in range(rnn_layers):
            size = ch if i == 0 else 2 * rnn_neurons
            self.fwd.append(rnn_cls(size, rnn_neurons, batch_first=True))
            self.bwd.append(rnn_cls(size, rnn_neurons, batch_first=True))
        self.mix = nn.Conv1d(2 * rnn_neurons + ch, output_size, mix_kernel, padding=mix_kernel // 2)
        self.out_norm = nn.LayerNorm(output_size)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """``x`` [B, T, F], relative ``lengths`` [B] -> [B, T, output_size]."""
        B, T, _ = x.shape
        if lengths is None:
            lengths = torch.ones(B, device=x.device)
        frames = abs_lengths(lengths, T)
        mask = (torch.arange(T, device=x.device)[None, :] < frames[:, None]).unsqueeze(-1).to(x.dtype)
        h = x * mask
        for conv, norm in zip(self.convs, self.norms):
            h = conv(h.transpose(1, 2))
            h = norm(h.transpose(1, 2)) if self.conv_norm == "layer" else norm(h).transpose(1, 2)
            h = self.drop(self.act(h)) * mask
        skip = h
        s = self.subsample
        if self.down is not None:
            pad = (-T) % s
            h = nn.functional.pad(h.transpose(1, 2), (0, pad))
            h = self.down(h).transpose(1, 2)
            rnn_lens = torch.div(frames + s - 1, s, rounding_mode="floor")
        else:
            rnn_lens = frames
        t = torch.arange(h.shape[1], device=h.device)[None, :]
        rev_idx = torch.where(t < rnn_lens[:, None], rnn_lens[:, None] - 1 - t, t)[:, :, None]

        def reverse(z):
            return z.gather(1, rev_idx.expand(-1, -1, z.shape[2]))

        out = h
        for i, (f, b) in enumerate(zip(self.fwd, self.bwd)):
            if i > 0:
                out = self.drop(out)
            out = torch.cat([f(out)[0], reverse(b(reverse(out))[0])], dim=-1)
        if s > 1:
            out = out.repeat_interleave(s, dim=1)[:, :T]
        out = self.drop(out)
        y = self.mix(torch.cat([out, skip], dim=-1).transpose(1, 2)).transpose(1, 2)
        return self.act(self.out_norm(y)) * mask


# --------------------------------------------------------------------------------------------------------------------
# Losses that keep the attention usable for durations
# --------------------------------------------------------------------------------------------------------------------
def guided_attention_loss(
    attn: torch.Tensor, token_lens: torch.Tensor, frame_lens: torch.Tensor, sigma: float = 0.3
) -> torch.Tensor:
    """Diagonal prior (Tachibana et al. 2017): attention mass off the diagonal band, ``W = 1 - exp(-(t/T - u/U)^2 /
    2 sigma^2)``, summed over frames and averaged over the real decoder steps (so it lies in [0, 1)).

    ``attn`` [B, U, T]; ``token_lens`` / ``frame_lens`` absolute lengths [B]. Padded cells do not count.
    """
    offset, valid = diagonal_offsets(attn, token_lens, frame_lens)
    w = 1.0 - torch.exp(-(offset**2) / (2 * sigma**2))
    rows = valid[:, :, 0].float().sum()  # the real decoder steps (frame 0 is real in every row)
    return (attn.float() * w * valid).sum() / rows.clamp(min=1)


def diagonal_offsets(attn: torch.Tensor, token_lens: torch.Tensor, frame_lens: torch.Tensor):
    """For ``attn`` [B, U, T] with absolute lengths: each cell's distance from the diagonal, ``t/T - u/U`` (cell
    centres, as fractions of the row's own lengths), and the mask of its real cells (both [B, U, T])."""
    _, U, T = attn.shape
    u = torch.arange(U, device=attn.device, dtype=torch.float32)[None, :, None]
    t = torch.arange(T, device=attn.device, dtype=torch.float32)[None, None, :]
    Ul = token_lens.float().clamp(min=1)[:, None, None]
    Tl = frame_lens.float().clamp(min=1)[:, None, None]
    return (t + 0.5) / Tl - (u + 0.5) / Ul, (u < Ul) & (t < Tl)


# --------------------------------------------------------------------------------------------------------------------
# Forward pass shared by training and inference
# --------------------------------------------------------------------------------------------------------------------
def _hp(hparams, key):
    return hparams[key] if isinstance(hparams, Mapping) else getattr(hparams, key)


def _mod(modules, key):
    return modules[key] if isinstance(modules, Mapping) or isinstance(modules, nn.ModuleDict) else getattr(modules, key)


def compute_feats(modules, hparams, wavs: torch.Tensor, wav_lens: torch.Tensor, epoch: int | None = None,
                  warp=None):
    """Fbank + global normalization (stats update only in train mode, until ``update_until_epoch``); ``warp``: a
    function applied to the log-mel features before normalization (training's VTLP, common/train_aids.py)."""
    with torch.autocast(device_type=wavs.device.type, enabled=False):
        feats = _hp(hparams, "compute_features")(wavs.float())
        if warp is not None:
            feats = warp(feats)
        return _mod(modules, "normalize")(feats, wav_lens, epoch=epoch)


def encode(modules, feats: torch.Tensor, wav_lens: torch.Tensor) -> torch.Tensor:
    """Encoder states [B, T, D], one per feature frame."""
    return _mod(modules, "enc")(feats, wav_lens)


def ctc_log_probs(modules, hparams, enc: torch.Tensor) -> torch.Tensor:
    return _hp(hparams, "log_softmax")(_mod(modules, "ctc_lin")(enc))


def attention_decode(modules, hparams, enc: torch.Tensor, wav_lens: torch.Tensor, tokens_bos: torch.Tensor):
    """Teacher-forced decoder: (seq log-probs [B, U+1, V], attention [B, U+1, T])."""
    e_in = _mod(modules, "emb")(tokens_bos)
    h, attn = _mod(modules, "dec")(e_in, enc, wav_lens)
    p_seq = _hp(hparams, "log_softmax")(_mod(modules, "seq_lin")(h))
    return p_seq, attn


@torch.no_grad()
def forward_scores(modules, hparams, wavs, wav_lens, tokens_bos, token_lens=None) -> dict:
    """Scores for alignment: ``dict(ctc_logp=[B,T,V], attn=[B,U+1,T], p_seq=[B,U+1,V], enc_lens=[B],
    token_lens=[B])``.

    ``tokens_bos`` [B, U+1] start with ``BOS_ID``; row ``u`` of ``attn`` is the attention while predicting token
    ``u`` (row ``U`` predicts eos). ``token_lens`` (relative, of ``tokens_bos``) gives the absolute count of real
    tokens (bos excluded) in the result. Modules must be in eval mode (``load_for_inference`` does that).
    """
    feats = compute_feats(modules, hparams, wavs, wav_lens)
    enc = encode(modules, feats, wav_lens)
    ctc_logp = ctc_log_probs(modules, hparams, enc)
    p_seq, attn = attention_decode(modules, hparams, enc, wav_lens, tokens_bos)
    enc_lens = abs_lengths(wav_lens, enc.shape[1])
    if token_lens is None:
        token_lens = torch.ones(tokens_bos.shape[0], device=tokens_bos.device)
    n_tok = abs_lengths(token_lens, tokens_bos.shape[1]) - 1
    return dict(ctc_logp=ctc_logp, attn=attn, p_seq=p_seq, enc_lens=enc_lens, token_lens=n_tok)


def ctc_greedy(ctc_logp: torch.Tensor, wav_lens: torch.Tensor) -> list[list[int]]:
    """Best-path CTC decoding (collapse repeats, drop blanks) -> token ids per utterance."""
    from speechbrain.decoders import ctc_greedy_decode

    return ctc_greedy_decode(ctc_logp, wav_lens, blank_id=BLANK_ID)


# --------------------------------------------------------------------------------------------------------------------
# Loading a trained model
# --------------------------------------------------------------------------------------------------------------------
def load_wav(path, hparams) -> torch.Tensor:
    """Mono float waveform of ``path`` at the model's ``sample_rate`` (any input rate is resampled)."""
    from common.audio import load_audio

    return load_audio(path, int(_hp(hparams, "sample_rate")))[0]


@dataclass
class TrainedModel:
    """A trained recognizer loaded from its run folder (``load_run``)."""
    modules: nn.ModuleDict  # eval mode, on the device asked for
    hparams: dict  # the run's hyperparams.yaml, loaded
    vocab: Vocab
    checkpoint: Path  # the checkpoint folder whose weights were loaded
    run: Path  # the run folder
    checkpoint_meta: dict | None = None  # what training saved with it (PER, joint, epoch)


def load_run(model_dir, device: str = "cpu", min_key: str = "PER", overrides: dict | None = None) -> TrainedModel:
    """Rebuild a trained recognizer from its ``output_folder`` (the run folder, ``common/run_folder.py``).

    Reads ``<model_dir>/hyperparams.yaml`` (saved by ``recipes/train.py`` with the CLI overrides baked in) with
    ``tokens_file`` pointed at ``<model_dir>/tokens.txt`` and ``output_folder`` at ``model_dir`` (so the run folder
    can be moved), and loads the checkpoint with the lowest ``min_key`` (valid ``PER``, or ``joint``: the best_joint
    score, recipes/train.py) through the yaml's Checkpointer.
    """
    from hyperpyyaml import load_hyperpyyaml

    model_dir = Path(model_dir)
    hp_file, tok_file = model_dir / HPARAMS_FILE, model_dir / TOKENS_FILE
    for f in (hp_file, tok_file):
        if not f.is_file():
            raise UserError(f"{f} not found; is {model_dir} the output_folder of recipes/train.py?")
    vocab = Vocab.load(tok_file)
    # the saved yaml holds the original paths with every reference resolved (the manifests' tokens.txt among them):
    # the run folder's own files decide
    text = hp_file.read_text(encoding="utf-8")
    ov = {"tokens_file": str(tok_file), "output_folder": str(model_dir), "noise_csv": None,
          "data_folder": str(model_dir)}
    if re.search(r"^output_neurons:", text, re.M):  # the recognizer's yaml (a StyleTTS2 run's has its own table)
        ov["output_neurons"] = len(vocab)
    ov.update(overrides or {})
    hparams = load_hyperpyyaml(text, ov)
    ckpter = hparams["checkpointer"]
    ckpter.checkpoints_dir = model_dir / "save"  # the saved yaml holds absolute paths of the original run folder
    ckpt = ckpter.find_checkpoint(min_key=min_key) if min_key else None
    if ckpt is None:
        ckpt = ckpter.find_checkpoint()
    if ckpt is None:
        raise UserError(f"{ckpter.checkpoints_dir}: no checkpoint found; train first (recipes/train.py)")
    if "model" not in ckpt.paramfiles and "lora" in ckpt.paramfiles:  # LoRA adapters only: base + adapters
        from common.finetune import load_lora_run

        load_lora_run(model_dir, hparams, ckpter, ckpt)
    else:
        ckpter.load_checkpoint(ckpt)
    modules = nn.ModuleDict(dict(hparams["modules"])).to(device).eval()
    return TrainedModel(modules, hparams, vocab, Path(ckpt.path).resolve(), model_dir.resolve(), dict(ckpt.meta))


def load_for_inference(model_dir, device: str = "cpu", min_key: str = "PER", overrides: dict | None = None):
    """``load_run`` as ``(modules, hparams, vocab)``: ``modules`` an eval-mode ``torch.nn.ModuleDict`` on ``device``
    (keys of the yaml ``modules``), ``hparams`` the loaded yaml dict, ``vocab`` the ``Vocab``."""
    m = load_run(model_dir, device, min_key, overrides)
    return m.modules, m.hparams, m.vocab


def batch_tokens_bos(token_ids: list[list[int]], device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Pad id lists into ``tokens_bos`` [B, U+1] (BOS first) and relative ``token_lens`` [B]."""
    U = max(len(t) for t in token_ids) + 1
    out = torch.zeros(len(token_ids), U, dtype=torch.long, device=device)
    lens = torch.zeros(len(token_ids), device=device)
    for i, t in enumerate(token_ids):
        out[i, 0] = BOS_ID
        out[i, 1 : len(t) + 1] = torch.tensor(t, dtype=torch.long)
        lens[i] = (len(t) + 1) / U
    return out, lens


def batch_wavs(wavs: list[torch.Tensor], device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Pad waveforms into [B, N] and relative lengths [B]."""
    N = max(int(w.shape[-1]) for w in wavs)
    out = torch.zeros(len(wavs), N, device=device)
    lens = torch.zeros(len(wavs), device=device)
    for i, w in enumerate(wavs):
        out[i, : w.shape[-1]] = w
        lens[i] = w.shape[-1] / N
    return out, lens


__all__ = [
    "ConvRNNEncoder", "guided_attention_loss", "forward_scores", "load_run", "load_for_inference", "TrainedModel",
    "load_wav", "ctc_greedy", "batch_tokens_bos", "batch_wavs", "compute_feats", "encode", "ctc_log_probs",
    "attention_decode", "ctc_min_frames", "abs_lengths", "vocab_size", "feature_hop_samples",
]
