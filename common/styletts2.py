"""StyleTTS2's text aligner (AuxiliaryASR's ``ASRCNN``) as a module of this project: its checkpoint, features, tokens,
scores for the export, fine-tuning helpers and the write-back in StyleTTS2's format.

StyleTTS2 ships ``Utils/ASR/epoch_00080.pth`` + ``config.yml``: ``torch.save({"model": state_dict, ...})`` of
``ASRCNN(**config["model_params"])``. ``StyleTTS2ASR`` below is our own implementation of the same network with the
same parameter names and shapes, so that state dict loads into it strictly (``load_checkpoint``) and it computes
the same outputs (checked against outputs of StyleTTS2's code, ``tests/test_styletts2.py``):

    wav (24 kHz) -> mel (n_fft 2048, win 1200, hop 300, 80 bands; (log(1e-5 + mel) + 4) / 4; even frame count)
      -> to_mfcc (DCT, 40) -> init_cnn (stride 2: 25 ms frames) -> 6 x [residual dilated conv block, GroupNorm]
      -> projection -> ctc_linear                                        (CTC logits [B, T, n_token])
                    -> asr_s2s (LSTM decoder, location-aware attention)  (decoder logits / attention [B, U+1, ...])

Differences from upstream, on purpose: the decoder never replaces input tokens by ``<unk>`` outside training
(StyleTTS2's ``ASRS2S`` does it even in eval mode), and padded frames of a batch are masked out of the convolutions
and the GroupNorm statistics, so an utterance scores the same alone or in any batch (upstream, padding changes
the normalization of every frame). A single unpadded utterance takes exactly upstream's computation.

Tokens: StyleTTS2's symbol table (``SYMBOLS``: ``$`` then Matcha-TTS's ``symbols`` without its pad), one id per IPA
character of the espeak-ng phonemes, with ``0`` at both ends; our word separator ``|`` is its space. Durations as
``train_second.py``: the attention with its first decoder step dropped (one row per input token, the two ``0``
edges included), through MAS. The export uses the two edge rows as its leading/trailing silence slots.
"""
from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from common.io import UserError, atomic_path, write_json
from common.vocab import WORD_SEP, symbol_to_token, token_to_symbol

SAMPLE_RATE = 24000
N_FFT, WIN_LENGTH, HOP_LENGTH, N_MELS = 2048, 1200, 300, 80
LOG_MEL_MEAN, LOG_MEL_STD = -4.0, 4.0
N_DOWN = 1  # init_cnn's stride 2: one ASR frame per two mel frames
FRAME_S = HOP_LENGTH * 2**N_DOWN / SAMPLE_RATE  # 25 ms
SOS_ID, UNK_ID, PAD_ID = 1, 3, 0  # ASRS2S's sos / unk ids (symbols ';' and ','), the text pad and edge token '$'
DEFAULT_BLANK = 16  # AuxiliaryASR's trainer uses the space symbol's id as the CTC blank
CONFIG_FILE = "config.yml"
SYMBOLS_FILE = "symbols.json"  # beside a checkpoint whose n_token is not StyleTTS2's 178 (our write-back adds it)
RUN_FILE = "styletts2.json"  # in a fine-tuning run folder: the vocabulary mapping, the model config

# StyleTTS2's text_utils.py table: pad, punctuation, ASCII letters, IPA letters (178 symbols)
_PUNCTUATION = ';:,.!?¡¿—…"«»“” '
_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_LETTERS_IPA = ("ɑɐɒæɓʙβɔɕçɗɖðʤəɘɚɛɜɝɞɟʄɡɠɢʛɦɧħɥʜɨɪʝɭɬɫɮʟɱɯɰŋɳɲɴøɵɸθœ"
                "ɶʘɹɺɾɻʀʁɽʂʃʈʧʉʊʋⱱʌɣɤʍχʎʏʑʐʒʔʡʕʢǀǁǂǃˈˌːˑʼʴʰʱʲʷˠˤ˞↓↑→↗↘"
                "'̩'ᵻ")
SYMBOLS: list[str] = ["$"] + list(_PUNCTUATION) + list(_LETTERS) + list(_LETTERS_IPA)
MODEL_PARAMS = ("input_dim", "hidden_dim", "n_token", "token_embedding_dim")


# --------------------------------------------------------------------------------------------------------------------
# Vocabulary
# --------------------------------------------------------------------------------------------------------------------
@dataclass
class SymbolVocab:
    """A StyleTTS2 symbol table seen through our token names (``|`` for its space), with ``Vocab``'s interface
    (``tokens``, ``index``, ``encode``, ``len``). ``source`` names it in errors."""
    symbols: list[str]
    source: str = "StyleTTS2's symbol table"
    hint: str = ("fine-tune the checkpoint on this corpus (recipes/train.py hparams/styletts2_asr.yaml), which adds "
                 "rows for new symbols, or fix the transcript")
    symbol_ids: dict = field(default_factory=dict)

    def __post_init__(self):
        self.tokens = [symbol_to_token(s) for s in self.symbols]
        self.index = {t: i for i, t in enumerate(self.tokens)}

    def __len__(self) -> int:
        return len(self.tokens)

    def encode(self, phn: str | list[str], where: str = "") -> list[int]:
        toks = phn.split() if isinstance(phn, str) else phn
        unknown = sorted({t for t in toks if t not in self.index})
        if unknown:
            raise UserError(f"{where + ': ' if where else ''}{self.unknown_message(unknown)}")
        return [self.index[t] for t in toks]

    def unknown_message(self, unknown) -> str:
        return f"symbol(s) {unknown} not in {self.source} ({len(self)} symbols); {self.hint}"

    def decode(self, ids) -> list[str]:
        return [self.tokens[int(i)] for i in ids]


def new_symbols(tokens: list[str], symbols: list[str]) -> list[str]:
    """Symbols of our ``tokens`` (``tokens.txt`` order, specials aside) that ``symbols`` lacks."""
    from common.vocab import SPECIALS

    have = set(symbols)
    return [token_to_symbol(t) for t in tokens if t not in SPECIALS and token_to_symbol(t) not in have]


# --------------------------------------------------------------------------------------------------------------------
# The network (parameter names and shapes as StyleTTS2's Utils/ASR/models.py + layers.py)
# --------------------------------------------------------------------------------------------------------------------
class _Linear(nn.Module):
    """``LinearNorm``: a Linear under the name ``linear_layer`` (Xavier-initialised)."""

    def __init__(self, in_dim: int, out_dim: int, bias: bool = True, gain: str = "linear"):
        super().__init__()
        self.linear_layer = nn.Linear(in_dim, out_dim, bias=bias)
        nn.init.xavier_uniform_(self.linear_layer.weight, gain=nn.init.calculate_gain(gain))

    def forward(self, x):
        return self.linear_layer(x)


class _Conv(nn.Module):
    """``ConvNorm``: a Conv1d under the name ``conv`` ("same" padding by default, Xavier-initialised)."""

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int = 1, stride: int = 1, padding: int | None = None,
                 dilation: int = 1, bias: bool = True):
        super().__init__()
        if padding is None:
            padding = dilation * (kernel_size - 1) // 2
        self.conv = nn.Conv1d(in_ch, out_ch, kernel_size, stride=stride, padding=padding, dilation=dilation, bias=bias)
        nn.init.xavier_uniform_(self.conv.weight)

    def forward(self, x):
        return self.conv(x)


class _MFCC(nn.Module):
    """The DCT-II (orthonormal) of the log-mel bands: 80 -> 40 coefficients; ``dct_mat`` is a saved buffer."""

    def __init__(self, n_mfcc: int = 40, n_mels: int = 80):
        super().__init__()
        import torchaudio.functional as taf

        self.register_buffer("dct_mat", taf.create_dct(n_mfcc, n_mels, "ortho"))

    def forward(self, mel):  # [B, n_mels, T] -> [B, n_mfcc, T]
        return torch.matmul(mel.transpose(1, 2), self.dct_mat).transpose(1, 2)


def _group_norm(x: torch.Tensor, norm: nn.GroupNorm, mask: torch.Tensor | None) -> torch.Tensor:
    """GroupNorm over the valid frames only (``mask`` [B, 1, T], 1 = frame); plain GroupNorm without padding."""
    if mask is None:
        return norm(x)
    B, C, T = x.shape
    G = norm.num_groups
    xg, m = x.reshape(B, G, C // G, T), mask[:, None]
    count = m.sum((2, 3), keepdim=True) * (C // G)
    mean = (xg * m).sum((2, 3), keepdim=True) / count
    var = (((xg - mean) * m) ** 2).sum((2, 3), keepdim=True) / count
    y = ((xg - mean) / torch.sqrt(var + norm.eps)).reshape(B, C, T)
    return (y * norm.weight[None, :, None] + norm.bias[None, :, None]) * mask


def _masked(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    return x if mask is None else x * mask


class _ResBlock(nn.Module):
    """``ConvBlock``: three residual units [dilated conv (1, 3, 9), ReLU, GroupNorm(8), dropout, conv, ReLU,
    dropout] under the name ``blocks``."""

    def __init__(self, channels: int, n_conv: int = 3, dropout: float = 0.2):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Sequential(
            _Conv(channels, channels, 3, dilation=3**i), nn.ReLU(), nn.GroupNorm(8, channels), nn.Dropout(dropout),
            _Conv(channels, channels, 3), nn.ReLU(), nn.Dropout(dropout)) for i in range(n_conv))

    def forward(self, x, mask=None):
        for unit in self.blocks:
            conv1, act1, norm, drop1, conv2, act2, drop2 = unit
            h = drop1(_group_norm(act1(_masked(conv1(x), mask)), norm, mask))
            x = x + drop2(act2(_masked(conv2(h), mask)))
        return x


class _LocationAttention(nn.Module):
    """Tacotron 2's location-sensitive attention (``Attention`` + ``LocationLayer``), its parameter names."""

    def __init__(self, query_dim: int, memory_dim: int, attn_dim: int, n_filters: int = 32, kernel_size: int = 63):
        super().__init__()
        self.query_layer = _Linear(query_dim, attn_dim, bias=False, gain="tanh")
        self.memory_layer = _Linear(memory_dim, attn_dim, bias=False, gain="tanh")
        self.v = _Linear(attn_dim, 1, bias=False)
        self.location_layer = nn.Module()
        self.location_layer.location_conv = _Conv(2, n_filters, kernel_size, padding=(kernel_size - 1) // 2,
                                                  bias=False)
        self.location_layer.location_dense = _Linear(n_filters, attn_dim, bias=False, gain="tanh")

    def forward(self, query, memory, processed_memory, prev_and_cum, pad_mask):
        """One step: (context [B, H], weights [B, T]). ``prev_and_cum`` [B, 2, T]; ``pad_mask`` [B, T] True = pad."""
        loc = self.location_layer.location_dense(self.location_layer.location_conv(prev_and_cum).transpose(1, 2))
        energy = self.v(torch.tanh(self.query_layer(query)[:, None] + loc + processed_memory)).squeeze(-1)
        if pad_mask is not None:
            energy = energy.masked_fill(pad_mask, -float("inf"))
        weights = torch.softmax(energy, dim=1)
        return torch.bmm(weights[:, None], memory).squeeze(1), weights


class _Decoder(nn.Module):
    """``ASRS2S``: teacher-forced LSTM decoder with location-aware attention over the encoder frames."""

    def __init__(self, embedding_dim: int, hidden_dim: int, n_token: int, n_location_filters: int = 32,
                 location_kernel_size: int = 63, unk_prob: float = 0.1):
        super().__init__()
        self.embedding = nn.Embedding(n_token, embedding_dim)
        bound = math.sqrt(6 / hidden_dim)
        nn.init.uniform_(self.embedding.weight, -bound, bound)
        self.project_to_n_symbols = nn.Linear(hidden_dim, n_token)
        self.attention_layer = _LocationAttention(hidden_dim, hidden_dim, hidden_dim, n_location_filters,
                                                  location_kernel_size)
        self.decoder_rnn = nn.LSTMCell(hidden_dim + embedding_dim, hidden_dim)
        self.project_to_hidden = nn.Sequential(_Linear(hidden_dim * 2, hidden_dim), nn.Tanh())
        self.hidden_dim = hidden_dim
        self.unk_prob = unk_prob

    def forward(self, memory, pad_mask, text):
        """``memory`` [B, T, H], ``pad_mask`` [B, T] (True = padding) or None, ``text`` [B, U] ->
        (logits [B, U+1, V], attention [B, U+1, T]); step 0 reads the sos token, step u+1 token u."""
        B, T, H = memory.shape
        if self.training and self.unk_prob > 0:  # upstream's token dropout, in training only
            text = text.masked_fill(torch.rand(text.shape, device=text.device) < self.unk_prob, UNK_ID)
        steps = torch.cat([torch.full((B, 1), SOS_ID, dtype=text.dtype, device=text.device), text], 1)
        inputs = self.embedding(steps)
        h = c = memory.new_zeros(B, self.hidden_dim)
        weights, cum, context = memory.new_zeros(B, T), memory.new_zeros(B, T), memory.new_zeros(B, H)
        processed = self.attention_layer.memory_layer(memory)
        logits, attns = [], []
        for t in range(inputs.shape[1]):
            h, c = self.decoder_rnn(torch.cat([inputs[:, t], context], -1), (h, c))
            context, weights = self.attention_layer(h, memory, processed, torch.stack([weights, cum], 1), pad_mask)
            cum = cum + weights
            hidden = self.project_to_hidden(torch.cat([h, context], -1))
            logits.append(self.project_to_n_symbols(F.dropout(hidden, 0.5, self.training)))
            attns.append(weights)
        return torch.stack(logits, 1), torch.stack(attns, 1)


class StyleTTS2ASR(nn.Module):
    """AuxiliaryASR's ``ASRCNN`` (StyleTTS2's text aligner): ``StyleTTS2ASR(**config["model_params"])`` has the
    state dict of ``ASRCNN(**config["model_params"])``.

    ``forward(mel, mel_lens, text)`` -> (ctc_logit [B, T, n_token], s2s_logit [B, U+1, n_token],
    s2s_attn [B, U+1, T]) with T = mel frames // 2; ``text=None`` returns the CTC logits only. ``mel`` is the
    normalized log-mel [B, 80, 2T] (``log_mel``), zero-padded; ``mel_lens`` [B] its valid frames (even) or None."""

    def __init__(self, input_dim: int = 80, hidden_dim: int = 256, n_token: int = 178, n_layers: int = 6,
                 token_embedding_dim: int = 256, unk_prob: float = 0.1):
        super().__init__()
        self.n_token, self.n_down = n_token, N_DOWN
        self.to_mfcc = _MFCC()
        self.init_cnn = _Conv(input_dim // 2, hidden_dim, kernel_size=7, padding=3, stride=2)
        self.cnns = nn.Sequential(*[nn.Sequential(_ResBlock(hidden_dim), nn.GroupNorm(1, hidden_dim))
                                    for _ in range(n_layers)])
        self.projection = _Conv(hidden_dim, hidden_dim // 2)
        self.ctc_linear = nn.Sequential(_Linear(hidden_dim // 2, hidden_dim), nn.ReLU(), _Linear(hidden_dim, n_token))
        self.asr_s2s = _Decoder(token_embedding_dim, hidden_dim // 2, n_token, unk_prob=unk_prob)

    @staticmethod
    def frame_mask(frame_lens: torch.Tensor | None, T: int):
        """[B, 1, T] float mask of the valid ASR frames, or None when nothing is padded."""
        if frame_lens is None or bool((frame_lens >= T).all()):
            return None
        return (torch.arange(T, device=frame_lens.device)[None, :] < frame_lens[:, None]).float()[:, None]

    def encode(self, mel: torch.Tensor, mel_lens: torch.Tensor | None = None):
        """Encoder states [B, T, hidden/2] and the frame mask ([B, 1, T] or None)."""
        x = self.init_cnn(self.to_mfcc(mel))
        mask = self.frame_mask(None if mel_lens is None else mel_lens // 2**self.n_down, x.shape[-1])
        x = _masked(x, mask)
        for block, norm in self.cnns:
            x = _group_norm(block(x, mask), norm, mask)
        return _masked(self.projection(x), mask).transpose(1, 2), mask

    def forward(self, mel, mel_lens=None, text=None):
        memory, mask = self.encode(mel, mel_lens)
        ctc_logit = self.ctc_linear(memory)
        if text is None:
            return ctc_logit
        s2s_logit, s2s_attn = self.asr_s2s(memory, None if mask is None else mask[:, 0] < 0.5, text)
        return ctc_logit, s2s_logit, s2s_attn


# --------------------------------------------------------------------------------------------------------------------
# Features and batches
# --------------------------------------------------------------------------------------------------------------------
_MEL: dict = {}


def log_mel(wav: torch.Tensor) -> torch.Tensor:
    """StyleTTS2's features of one 24 kHz waveform [N]: torchaudio's MelSpectrogram with its defaults besides n_fft
    2048 / win 1200 / hop 300 / 80 bands (so its filterbank is laid out for 16 kHz, as upstream), then
    ``(log(1e-5 + mel) + 4) / 4``, cut to an even frame count -> [80, T]."""
    import torchaudio

    key = str(wav.device)
    if key not in _MEL:
        _MEL[key] = torchaudio.transforms.MelSpectrogram(n_mels=N_MELS, n_fft=N_FFT, win_length=WIN_LENGTH,
                                                         hop_length=HOP_LENGTH).to(wav.device)
    with torch.autocast(device_type=wav.device.type, enabled=False):
        mel = (torch.log(1e-5 + _MEL[key](wav.float())) - LOG_MEL_MEAN) / LOG_MEL_STD
    return mel[:, : mel.shape[1] - mel.shape[1] % 2]


def num_frames(num_samples: int) -> int:
    """ASR frames (25 ms) of a 24 kHz signal: half its even mel frame count."""
    mel = int(num_samples) // HOP_LENGTH + 1
    return (mel - mel % 2) // 2**N_DOWN


def batch_mels(wavs: torch.Tensor, wav_lens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Padded 24 kHz waveforms [B, N] + relative lengths -> zero-padded mels [B, 80, M] and their lengths [B]. Each
    mel is computed from its own samples (the STFT's reflect padding never reads another row's padding)."""
    n = torch.round(wav_lens.float() * wavs.shape[1]).long().clamp(min=1).tolist()
    mels = [log_mel(w[:k]) for w, k in zip(wavs, n)]
    lens = torch.tensor([m.shape[1] for m in mels], device=wavs.device)
    out = wavs.new_zeros(len(mels), N_MELS, int(lens.max()))
    for b, m in enumerate(mels):
        out[b, :, : m.shape[1]] = m
    return out, lens


def text_batch(ids: list[list[int]], device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """StyleTTS2's text input: ``[0, ids..., 0]`` per row, padded with 0 -> ([B, U+2], lengths [B])."""
    U = max(len(t) for t in ids) + 2
    out = torch.full((len(ids), U), PAD_ID, dtype=torch.long)
    for b, t in enumerate(ids):
        out[b, 1: len(t) + 1] = torch.as_tensor(t, dtype=torch.long)
    return out.to(device), torch.tensor([len(t) + 2 for t in ids], device=device)


def token_rows(s2s_attn: torch.Tensor) -> torch.Tensor:
    """``train_second.py``'s alignment: the attention without its first decoder step -> one row per input token."""
    return s2s_attn[:, 1:]


# --------------------------------------------------------------------------------------------------------------------
# Checkpoints and configs
# --------------------------------------------------------------------------------------------------------------------
def read_config(path) -> dict:
    """The whole config.yml (``model_params`` checked: the four ASRCNN arguments, input_dim 80)."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: StyleTTS2 ASR config not found; it sits beside epoch_00080.pth in "
                        f"StyleTTS2's Utils/ASR/ (or pass --styletts2_config)")
    try:
        cfg = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise UserError(f"{path}: not a readable yaml file ({str(err).splitlines()[0]})") from None
    mp = cfg.get("model_params") if isinstance(cfg, dict) else None
    if not isinstance(mp, dict) or any(not isinstance(mp.get(k), int) for k in MODEL_PARAMS) \
            or set(mp) - set(MODEL_PARAMS) - {"n_layers"}:
        raise UserError(f"{path}: model_params must hold integers {', '.join(MODEL_PARAMS)} (StyleTTS2's "
                        f"Utils/ASR/config.yml), got {mp!r}")
    if mp["input_dim"] != N_MELS:
        raise UserError(f"{path}: model_params.input_dim is {mp['input_dim']}, but the ASR reads {N_MELS} mel bands; "
                        f"use the config.yml that came with the checkpoint")
    return cfg


def model_params(cfg: dict) -> dict:
    return {k: int(v) for k, v in cfg["model_params"].items()}


def config_path(checkpoint, config=None) -> Path:
    return Path(config) if config else Path(checkpoint).parent / CONFIG_FILE


def read_state(path) -> dict:
    """``torch.load(path, weights_only=True)["model"]`` with one-line errors (a ``module.`` prefix is dropped)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: StyleTTS2 ASR checkpoint not found (StyleTTS2's Utils/ASR/epoch_00080.pth)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unpickling failure is the same user error
        raise UserError(f"{path}: cannot read as a torch checkpoint ({type(err).__name__}); give StyleTTS2's "
                        f"Utils/ASR/epoch_00080.pth") from None
    state = ckpt.get("model") if isinstance(ckpt, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{path}: no 'model' state dict in it: not a StyleTTS2/AuxiliaryASR checkpoint")
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def check_state(state: dict, model: nn.Module, where: str, cfg_where: str) -> None:
    """Every key and shape of ``model`` in ``state`` and nothing else; the first mismatch named."""
    ours = model.state_dict()
    for k in ours:
        if k not in state:
            raise UserError(f"{where}: key {k!r} missing: not a StyleTTS2 ASR (ASRCNN) checkpoint")
    for k in state:
        if k not in ours:
            raise UserError(f"{where}: unexpected key {k!r}: not a StyleTTS2 ASR (ASRCNN) checkpoint")
    for k, v in ours.items():
        if tuple(state[k].shape) != tuple(v.shape):
            raise UserError(f"{where}: key {k!r} has shape {tuple(state[k].shape)} but {cfg_where}'s model_params "
                            f"give {tuple(v.shape)}: the config does not fit this checkpoint")


def checkpoint_symbols(checkpoint, n_token: int) -> list[str]:
    """The symbol table of a checkpoint: StyleTTS2's for its 178 tokens, else ``symbols.json`` beside it."""
    side = Path(checkpoint).parent / SYMBOLS_FILE
    if side.is_file():
        syms = json.loads(side.read_text(encoding="utf-8"))
        if not isinstance(syms, list) or len(syms) != n_token or not all(isinstance(s, str) for s in syms):
            raise UserError(f"{side}: expected a list of {n_token} symbols (config.yml's n_token)")
        return syms
    if n_token != len(SYMBOLS):
        raise UserError(f"{checkpoint}: n_token is {n_token} but StyleTTS2's symbol table has {len(SYMBOLS)}; put the "
                        f"checkpoint's symbol list in {side} (a JSON list, the id order)")
    return list(SYMBOLS)


@dataclass
class LoadedASR:
    """A StyleTTS2 ASR checkpoint loaded into ``StyleTTS2ASR`` (eval mode) with its symbols and config."""
    model: StyleTTS2ASR
    vocab: SymbolVocab
    config: dict
    checkpoint: Path


def load_checkpoint(checkpoint, config=None, device: str = "cpu") -> LoadedASR:
    """``epoch_00080.pth`` (+ ``config.yml``, beside it by default) -> our module, strictly loaded."""
    checkpoint = Path(checkpoint)
    cfg_file = config_path(checkpoint, config)
    cfg = read_config(cfg_file)
    state = read_state(checkpoint)
    model = StyleTTS2ASR(**model_params(cfg))
    check_state(state, model, str(checkpoint), str(cfg_file))
    model.load_state_dict(state, strict=True)
    syms = checkpoint_symbols(checkpoint, model.n_token)
    vocab = SymbolVocab(syms, source=f"the symbol table of {checkpoint}")
    return LoadedASR(model.to(device).eval(), vocab, cfg, checkpoint.resolve())


def plain_state_dict(model: nn.Module) -> dict:
    """The state dict in StyleTTS2's layout: LoRA adapters, if any, folded into their layers."""
    from speechbrain.nnet.adapters import replace_module

    from common.finetune import LoRAWithDropout

    if any(isinstance(m, LoRAWithDropout) for m in model.modules()):
        model = copy.deepcopy(model)
        for name, m in list(model.named_modules()):
            if isinstance(m, LoRAWithDropout):
                replace_module(model, name, m.merged())
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def save_checkpoint(model: nn.Module, out, config: dict, symbols: list[str], epochs: int = 0, steps: int = 0) -> Path:
    """Write ``out`` as StyleTTS2 saves its ASR (``{"model", "optimizer", "steps", "epochs"}``) with ``config.yml``
    beside it (``n_token`` = the symbols), and ``symbols.json`` when the table is not StyleTTS2's own."""
    import yaml

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    state = plain_state_dict(model)
    cfg = copy.deepcopy(config)
    cfg["model_params"]["n_token"] = len(symbols)
    with atomic_path(out) as tmp:
        torch.save({"model": state, "optimizer": {}, "steps": int(steps), "epochs": int(epochs)}, tmp)
    with atomic_path(out.parent / CONFIG_FILE) as tmp:
        tmp.write_text(yaml.safe_dump(cfg, sort_keys=False, allow_unicode=True), encoding="utf-8")
    side = out.parent / SYMBOLS_FILE
    if list(symbols) != SYMBOLS:
        write_json(side, list(symbols))
    elif side.is_file():
        side.unlink()
    return out


# --------------------------------------------------------------------------------------------------------------------
# Scores for the export (common/export.py's FirstPass)
# --------------------------------------------------------------------------------------------------------------------
class StyleTTS2Scorer:
    """The export's scorer interface for this model: waveforms at ``sample_rate`` -> CTC log-probs [B, T, V],
    attention [B, U+2, T] (one row per input token, the two edge tokens included: ``edge_rows``) and frame
    counts, at ``hop_s`` seconds per frame (frame t centred at ``t * hop_s``, as our own features)."""
    sample_rate = SAMPLE_RATE
    hop_s = FRAME_S
    edge_rows = True

    def __init__(self, model: StyleTTS2ASR, vocab: SymbolVocab, blank_id: int = DEFAULT_BLANK):
        if not 0 <= int(blank_id) < len(vocab):
            raise UserError(f"--styletts2_blank {blank_id} is not a token id (0..{len(vocab) - 1})")
        self.model, self.vocab, self.blank_id = model.eval(), vocab, int(blank_id)

    def num_frames(self, num_samples: int) -> int:
        return num_frames(num_samples)

    @torch.inference_mode()
    def scores(self, wavs, lens, ids: list[list[int]], need_attn: bool, use_amp: bool):
        dev = next(self.model.parameters()).device
        wavs, lens = wavs.to(dev), lens.to(dev)
        mels, mel_lens = batch_mels(wavs, lens)
        with torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=use_amp):
            if need_attn:
                text, _ = text_batch(ids, dev)
                ctc, _, attn = self.model(mels, mel_lens, text)
                attn = token_rows(attn).float()
            else:
                ctc, attn = self.model(mels, mel_lens), None
        frame_lens = (mel_lens // 2**N_DOWN).tolist()
        return torch.log_softmax(ctc.float(), -1), attn, [int(t) for t in frame_lens]


def scorer_from_run(run) -> StyleTTS2Scorer:
    """The scorer of a fine-tuning run folder loaded by ``common.model.load_run`` (its ``styletts2.json``)."""
    spec = run.hparams["styletts2"]
    return StyleTTS2Scorer(run.modules["asr"], spec.vocab(source=f"the symbol table of {run.run}"),
                           run.hparams["blank_index"])


# --------------------------------------------------------------------------------------------------------------------
# Fine-tuning (recipes/train.py hparams/styletts2_asr.yaml)
# --------------------------------------------------------------------------------------------------------------------
@dataclass
class RunSpec:
    """What a fine-tuning run of the checkpoint is: its symbols (the checkpoint's, then the corpus' new ones), the
    checkpoint's config and path. Saved in the run folder as ``styletts2.json`` (the vocabulary mapping)."""
    symbols: list[str]
    added: list[str]
    config: dict
    pretrained: str
    config_file: str

    @property
    def n_base(self) -> int:
        return len(self.symbols) - len(self.added)

    def model_params(self) -> dict:
        return {**model_params(self.config), "n_token": len(self.symbols)}

    def vocab(self, source: str = "the fine-tuned model's symbol table") -> SymbolVocab:
        return SymbolVocab(self.symbols, source=source, hint="build manifests covering this corpus and fine-tune "
                                                             "again")

    def record(self) -> dict:
        return {"symbols": self.symbols, "added": self.added, "n_base": self.n_base,
                "token_map": {WORD_SEP: " "}, "pretrained": self.pretrained, "config_file": self.config_file,
                "config": self.config}


def run_spec(output_folder, pretrained_path, config=None, tokens_file=None) -> RunSpec:
    """yaml ``!apply``: the run folder's ``styletts2.json`` when there is one (a resumed run, a loaded run folder,
    even moved), else from ``pretrained_path`` (+ its config) and the corpus' ``tokens.txt``."""
    saved = Path(output_folder) / RUN_FILE
    if saved.is_file():
        d = json.loads(saved.read_text(encoding="utf-8"))
        return RunSpec(d["symbols"], d["added"], d["config"], d["pretrained"], d["config_file"])
    if not pretrained_path:
        raise UserError("hparams/styletts2_asr.yaml fine-tunes StyleTTS2's ASR: give --pretrained_path "
                        "Utils/ASR/epoch_00080.pth")
    cfg_file = config_path(pretrained_path, config)
    cfg = read_config(cfg_file)
    base = checkpoint_symbols(pretrained_path, model_params(cfg)["n_token"])
    from common.vocab import Vocab

    added = new_symbols(Vocab.load(tokens_file).tokens, base) if tokens_file else []
    return RunSpec(base + added, added, cfg, str(Path(pretrained_path).resolve()), str(cfg_file.resolve()))


def build_model(spec: RunSpec, unk_prob: float = 0.1) -> StyleTTS2ASR:
    """yaml ``!apply``: the module for a run (n_token = the run's symbols)."""
    return StyleTTS2ASR(**spec.model_params(), unk_prob=unk_prob)


def check_pretrained(hparams) -> Path:
    """``--pretrained_path epoch_00080.pth``: its keys/shapes must be ASRCNN's for its config (before anything is
    written); returns the checkpoint path."""
    spec: RunSpec = hparams["styletts2"]
    if not hparams["pretrained_path"]:
        raise UserError("hparams/styletts2_asr.yaml fine-tunes StyleTTS2's ASR: give --pretrained_path "
                        "Utils/ASR/epoch_00080.pth")
    ckpt = Path(hparams["pretrained_path"])
    base = StyleTTS2ASR(**model_params(spec.config))
    check_state(read_state(ckpt), base, str(ckpt), spec.config_file)
    return ckpt.resolve()


def extend_state(state: dict, n_new: int, seed: int = 0) -> dict:
    """New rows for ``n_new`` added symbols: decoder embedding (upstream's uniform init), decoder and CTC output
    layers (weights drawn like the existing rows, bias their mean); every existing row kept."""
    if n_new <= 0:
        return state
    g = torch.Generator().manual_seed(seed)
    state = dict(state)
    emb = state["asr_s2s.embedding.weight"]
    bound = math.sqrt(6 / state["asr_s2s.project_to_n_symbols.weight"].shape[1])
    state["asr_s2s.embedding.weight"] = torch.cat([emb, (torch.rand(n_new, emb.shape[1], generator=g) * 2 - 1) *
                                                   bound], 0)
    for w_key, b_key in (("asr_s2s.project_to_n_symbols.weight", "asr_s2s.project_to_n_symbols.bias"),
                         ("ctc_linear.2.linear_layer.weight", "ctc_linear.2.linear_layer.bias")):
        w, b = state[w_key], state[b_key]
        state[w_key] = torch.cat([w, torch.randn(n_new, w.shape[1], generator=g) * w.std()], 0)
        state[b_key] = torch.cat([b, b.mean().expand(n_new)], 0)
    return state


def load_pretrained(hparams, ckpt: Path) -> None:
    """Initialise the run's model from the checkpoint, with rows for the added symbols."""
    spec: RunSpec = hparams["styletts2"]
    state = extend_state(read_state(ckpt), len(spec.added), int(hparams["seed"]))
    hparams["model"].load_state_dict(state, strict=True)


def train_new_rows(model: nn.Module, n_base: int) -> list[str]:
    """LoRA runs: the rows of added symbols (embedding, both output layers) stay trainable while every other row is
    frozen (their gradient is masked); returns the parameter names."""
    names = []
    for name, p in model.named_parameters():
        if p.shape[0] > n_base and any(s in name for s in ("asr_s2s.embedding.", "asr_s2s.project_to_n_symbols.",
                                                          "ctc_linear.2.")) and "adapter_" not in name:
            keep = torch.zeros(p.shape[0], *([1] * (p.ndim - 1)), device=p.device)
            keep[n_base:] = 1
            p.requires_grad_(True)
            p.register_hook(lambda grad, keep=keep: grad * keep.to(grad.dtype))
            names.append(name)
    return names


def ctc_targets(ids: list[int], blank_id: int) -> list[int]:
    """CTC targets of a token row: the tokens whose id is not the blank (AuxiliaryASR's space is its blank)."""
    return [i for i in ids if i != blank_id]


def train_forward(asr: nn.Module, wavs, wav_lens, text, text_lens):
    """The training forward pass: features, then one call of the (possibly DDP-wrapped) module."""
    mels, mel_lens = batch_mels(wavs, wav_lens)
    ctc, s2s_logit, s2s_attn = asr(mels, mel_lens, text)
    frame_lens = mel_lens // 2**N_DOWN
    return {"ctc_logit": ctc, "s2s_logit": s2s_logit, "attn": token_rows(s2s_attn), "frame_lens": frame_lens,
            "text": text, "text_lens": text_lens}


def seq_loss(out: dict) -> torch.Tensor:
    """AuxiliaryASR's decoder loss: cross-entropy of each row's first len(text) steps against the text."""
    logit, text, lens = out["s2s_logit"], out["text"], out["text_lens"]
    steps = torch.arange(text.shape[1], device=text.device)[None] < lens[:, None]
    ce = F.cross_entropy(logit[:, : text.shape[1]].float().transpose(1, 2), text, reduction="none")
    return ((ce * steps).sum(1) / lens).mean()


def mono_loss(out: dict) -> torch.Tensor:
    """StyleTTS2's monotonic loss (train_first.py): L1 between the token-row attention (outside the valid cells
    zeroed) and its MAS path, mean over the padded batch."""
    from common.mas import maximum_path

    attn, tl, fl = out["attn"].float(), out["text_lens"], out["frame_lens"]
    valid = ((torch.arange(attn.shape[1], device=attn.device)[None, :, None] < tl[:, None, None])
             & (torch.arange(attn.shape[2], device=attn.device)[None, None, :] < fl[:, None, None]))
    attn = attn.masked_fill(~valid, 0.0)
    with torch.no_grad():
        path = maximum_path(attn.detach(), valid.float())
    return F.l1_loss(attn, path)


def ctc_log_probs(modules, hparams, wavs, wav_lens) -> torch.Tensor:
    """CTC log-probs of a run's model (``FineTuning.check_reload``'s comparison)."""
    mels, mel_lens = batch_mels(wavs, wav_lens)
    return torch.log_softmax(modules["asr"](mels, mel_lens).float(), -1)


def architecture(hparams) -> dict:
    """The model card's ``architecture`` entry."""
    spec: RunSpec = hparams["styletts2"]
    return {"features": "StyleTTS2 log-mel: 80 bands, n_fft 2048, win 1200, hop 300 at 24 kHz, (log + 4) / 4",
            "encoder": "StyleTTS2 ASRCNN (AuxiliaryASR)", "frame_shift_ms": FRAME_S * 1000,
            "ctc_blank_id": hparams["blank_index"], "model_params": spec.model_params(),
            "decoder": "ASRS2S (LSTM, location-aware attention)", "pretrained": spec.pretrained,
            "added_symbols": spec.added}


def write_back(run_dir, out, epochs: int = 0) -> Path:
    """The best checkpoint of a fine-tuning run folder (LoRA merged) as a StyleTTS2 ASR checkpoint ``out`` with
    ``config.yml`` beside it."""
    from common.model import load_run

    run = load_run(run_dir)
    spec: RunSpec = run.hparams["styletts2"]
    return save_checkpoint(run.modules["asr"], out, spec.config, spec.symbols, epochs=epochs)
