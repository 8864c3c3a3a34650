"""A Hugging Face CTC phoneme model (``Wav2Vec2ForCTC``, e.g. an espeak-IPA model you already have) as the export's
first-pass scorer: ``align/export_durations.py --first_pass hf:DIR_OR_NAME --scores ctc``.

Loading: ``DIR_OR_NAME`` is a folder written by ``save_pretrained`` (``config.json`` + weights, and the tokenizer's
``vocab.json``), or a hub name already in the local Hugging Face cache: nothing is ever downloaded
(``local_files_only=True``). ``transformers.AutoModelForCTC`` loads it (Wav2Vec2ForCTC; HuBERT / WavLM CTC models
share its conv front-end and load the same way, untested).

Vocabulary: the model's tokens (``vocab.json``, else ``config.id2label``) are mapped onto ours, the corpus tokens of
the G2P (by default espeak-ng IPA, one character a token, the word space ``|``). HF phoneme models emit
space-separated IPA phones, some of several characters (``tʃ``, ``aɪ``, ``iː``). THE RULE: our token ``s`` is scored,
per frame, by the posterior that the phone emitted there contains it: the sum of the posteriors of every HF phone of
which ``s`` is a part (equal to it, or a character / substring of it), so ``t`` and ``ʃ`` of our ``t ʃ`` both score
high where the model emits ``tʃ``, and the length mark ``ː`` wherever a long vowel is. ``|`` is the model's word
delimiter when it has one (``word_delimiter_token``, or a ``|`` token). Tokens without acoustics and without a
counterpart (``|``, stress marks, punctuation, silence: ``common.durations.NON_ACOUSTIC``) are scored by the CTC
blank (and are no CTC label: no anchor, no greedy-PER term), as StyleTTS2's word space is; they then share the
blank's class in the refinement. Any other token without a counterpart is a one-line error naming it. The blank is
the model's ``pad_token_id`` (the CTC blank of ``Wav2Vec2ForCTC``'s loss).

Frames: the conv front-end's stride (320 samples at 16 kHz: 20 ms frames) over the audio resampled to the model's
rate (``preprocessor_config.json``'s ``sampling_rate``, 16 kHz), normalized per utterance (zero mean, unit variance,
when ``do_normalize``) as its feature extractor does. Frame ``t`` of the front-end covers samples
``[t * 320, t * 320 + 400)`` (its receptive field, 25 ms), so it is centred 12.5 ms after ``t * 20 ms``; the audio is
padded with half the receptive field of zeros on each side, which centres frame ``t`` at ``t * hop`` -- the
convention of ``common/frames.py`` (to half a sample) -- and gives ``n // 320 + 1`` frames like a ``center=True``
extractor. The transformer above sees the whole utterance; its own timing bias, if any, is not corrected here.

Attention: none, so only ``--scores ctc`` (``common.export.ExportOptions`` refuses ``attention`` / ``joint``). After
the scores everything is as for our recognizer: CTC anchoring, MAS, refinement, Matcha frames.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from common.io import UserError
from common.vocab import BLANK_ID, SILENCE_TOKENS, SPECIALS, WORD_SEP

PREFIX = "hf:"
RECOGNIZER = "recognizer"


def model_name(first_pass: str) -> str | None:
    """``hf:DIR_OR_NAME`` -> ``DIR_OR_NAME``; ``recognizer`` -> None; anything else a ``UserError``."""
    if first_pass == RECOGNIZER:
        return None
    if first_pass.startswith(PREFIX) and first_pass[len(PREFIX):].strip():
        return first_pass[len(PREFIX):].strip()
    raise UserError(f"--first_pass must be 'recognizer' or 'hf:DIR_OR_NAME' (a Hugging Face CTC model), got "
                    f"{first_pass!r}")


def resolve(name: str) -> Path:
    """The model's folder: ``name`` itself, or its snapshot in the local Hugging Face cache (never downloaded)."""
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UserError(f"--first_pass hf:{name}: {path} has no config.json; give the folder a Hugging Face "
                            f"model was saved to (save_pretrained), with its vocab.json")
        return path
    if path.exists() or name.count("/") != 1 or name.startswith((".", "/", "~")):
        raise UserError(f"--first_pass hf:{name}: no such folder; give the folder of a Hugging Face CTC model "
                        f"(save_pretrained), or a hub name already in the local cache")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name, local_files_only=True))
    except Exception:  # noqa: BLE001 - not cached (LocalEntryNotFoundError), or a malformed name
        raise UserError(f"--first_pass hf:{name}: not a folder and not in the local Hugging Face cache (nothing is "
                        f"downloaded here); download it once (huggingface-cli download {name}) or give its "
                        f"folder") from None


def _json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UserError(f"{path}: not valid JSON") from None


def _token(value) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or ``{"content": ...}``."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def read_vocab(folder: Path, config) -> tuple[dict[int, str], set[int], int | None]:
    """(HF id -> token, the ids of special tokens, the word delimiter's id or None)."""
    vocab = _json(folder / "vocab.json")
    if vocab and all(isinstance(v, dict) for v in vocab.values()):
        raise UserError(f"{folder / 'vocab.json'}: a multilingual vocabulary (one table per language) is not "
                        f"supported; save the model with the table of your language")
    if vocab:
        id2tok = {int(i): str(t) for t, i in vocab.items()}
    else:
        labels = {int(i): str(t) for i, t in (getattr(config, "id2label", None) or {}).items()}
        if not labels or all(t.startswith("LABEL_") for t in labels.values()):
            raise UserError(f"{folder}: no vocab.json and no id2label in config.json: the model's output symbols "
                            f"are unknown; save its tokenizer (processor.save_pretrained) into the folder")
        id2tok = labels
    n_out = int(config.vocab_size)
    if max(id2tok) >= n_out:
        raise UserError(f"{folder}: vocab.json has id {max(id2tok)} but the model has {n_out} outputs; the "
                        f"vocabulary does not belong to this model")
    tok_cfg = {**_json(folder / "special_tokens_map.json"), **_json(folder / "tokenizer_config.json")}
    names = {_token(tok_cfg.get(k)) for k in ("pad_token", "unk_token", "bos_token", "eos_token")}
    special = {i for i, t in id2tok.items() if t in names or (t.startswith("<") and t.endswith(">") and len(t) > 2)}
    pad = config.pad_token_id
    if pad is None or int(pad) not in id2tok:
        raise UserError(f"{folder}: config.json's pad_token_id ({pad}) is not in its vocabulary; it is "
                        f"Wav2Vec2ForCTC's CTC blank")
    special.add(int(pad))
    delim = _token(tok_cfg.get("word_delimiter_token")) or ("|" if "|" in id2tok.values() else None)
    delim_id = next((i for i, t in id2tok.items() if t == delim), None) if delim else None
    if delim_id is not None:
        special.discard(delim_id)
    return id2tok, special, delim_id


@dataclass
class HFVocab:
    """Our tokens as columns of the HF model's output (``columns`` [V_hf, V_ours]: 1 where the HF token scores
    ours), with ``Vocab``'s interface (``tokens``, ``index``, ``encode``, ``len``). Tokens scored by the blank map to
    ``BLANK_ID``. ``source`` names the model in errors."""
    tokens: list[str]
    index: dict[str, int]
    columns: torch.Tensor
    mapping: dict[str, list[str]]
    source: str
    symbol_ids: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.tokens)

    def encode(self, phn, where: str = "") -> list[int]:
        toks = phn.split() if isinstance(phn, str) else phn
        unknown = sorted({t for t in toks if t not in self.index})
        if unknown:
            raise UserError(f"{where + ': ' if where else ''}{self.unknown_message(unknown)}")
        return [self.index[t] for t in toks]

    def unknown_message(self, unknown) -> str:
        return (f"symbol(s) {unknown} have no counterpart in the vocabulary of {self.source} (no HF token equals "
                f"or contains them); use a model whose phone set covers your G2P's, or a --g2p whose symbols it "
                f"covers")

    def decode(self, ids) -> list[str]:
        return [self.tokens[int(i)] for i in ids if int(i) >= len(SPECIALS)]


def build_vocab(id2tok: dict[int, str], special: set[int], delim_id: int | None, blank_id: int, n_out: int,
                source: str) -> HFVocab:
    """Our tokens and their HF columns by the module's rule: every character (and every whole token) of the HF
    phones scores the phones that contain it; ``|`` the word delimiter, when there is one; the blank column is the
    HF blank; every non-acoustic token without a counterpart maps to the blank."""
    from common.durations import NON_ACOUSTIC

    phones = {i: t for i, t in id2tok.items() if i not in special and i != delim_id and t.strip()}
    ours: dict[str, set[int]] = {}
    for i, t in phones.items():
        for part in {t, *t}:
            ours.setdefault(part, set())
    for s in ours:
        ours[s] = {i for i, t in phones.items() if s in t}
    if delim_id is not None:
        ours[WORD_SEP] = {delim_id}
    tokens = SPECIALS + sorted(ours)
    index = {t: k for k, t in enumerate(tokens)}
    cols = torch.zeros(n_out, len(tokens))
    cols[blank_id, BLANK_ID] = 1.0
    for s, ids in ours.items():
        cols[sorted(ids), index[s]] = 1.0
    for t in set(NON_ACOUSTIC) | SILENCE_TOKENS:  # the documented fallback: scored by the blank
        index.setdefault(t, BLANK_ID)
    mapping = {s: sorted(id2tok[i] for i in ids) for s, ids in sorted(ours.items())}
    return HFVocab(tokens, index, cols, mapping, source)


def receptive_field(kernels, strides) -> int:
    """Samples seen by one frame of a conv stack: ``1 + sum((k_i - 1) * prod(strides before i))``."""
    rf, jump = 1, 1
    for k, s in zip(kernels, strides):
        rf += (int(k) - 1) * jump
        jump *= int(s)
    return rf


class HFScorer:
    """The export's scorer interface (as ``common.export.RecognizerScorer``) for a HF CTC model: waveforms at
    ``sample_rate`` -> our tokens' CTC log-scores [B, T, V_ours] (the module's mapping rule), no attention, frame
    counts at ``hop_s`` (frame t centred at ``t * hop_s``: the audio is padded by half the receptive field)."""
    edge_rows = False
    blank_id = BLANK_ID

    def __init__(self, model, vocab: HFVocab, sample_rate: int = 16000, normalize: bool = True):
        cfg = model.config
        self.model, self.vocab = model.eval(), vocab
        self.kernels, self.strides = list(cfg.conv_kernel), list(cfg.conv_stride)
        self.sample_rate, self.normalize = int(sample_rate), bool(normalize)
        self.hop = 1
        for s in self.strides:
            self.hop *= int(s)
        self.hop_s = self.hop / self.sample_rate
        self.pad = receptive_field(self.kernels, self.strides) // 2
        self.batched = getattr(cfg, "feat_extract_norm", "group") == "layer"  # group norm: one row at a time

    def num_frames(self, num_samples: int) -> int:
        n = int(num_samples) + 2 * self.pad
        for k, s in zip(self.kernels, self.strides):
            n = (n - int(k)) // int(s) + 1
        return max(n, 0)

    def _inputs(self, wav: torch.Tensor) -> torch.Tensor:
        if self.normalize:
            wav = (wav - wav.mean()) / torch.sqrt(wav.var(unbiased=False) + 1e-7)
        return torch.nn.functional.pad(wav, (self.pad, self.pad))

    @torch.inference_mode()
    def scores(self, wavs, lens, ids: list[list[int]], need_attn: bool, use_amp: bool):
        if need_attn:
            raise UserError("a Hugging Face CTC model has no attention: use --scores ctc")
        dev = next(self.model.parameters()).device
        n = [int(round(float(r) * wavs.shape[1])) for r in lens]
        x = [self._inputs(wavs[k, : n[k]].float()) for k in range(len(n))]
        groups = [list(range(len(x)))] if self.batched else [[k] for k in range(len(x))]
        frame_lens = [self.num_frames(m) for m in n]
        out = torch.full((len(x), max(frame_lens), len(self.vocab)), -1e4)
        cols = self.vocab.columns.to(dev)
        for g in groups:
            width = max(x[k].shape[0] for k in g)
            batch = torch.zeros(len(g), width, device=dev)
            mask = torch.zeros(len(g), width, dtype=torch.long, device=dev)
            for j, k in enumerate(g):
                batch[j, : x[k].shape[0]] = x[k].to(dev)
                mask[j, : x[k].shape[0]] = 1
            with torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=use_amp):
                logits = self.model(batch, attention_mask=mask if self.batched else None).logits
            probs = torch.softmax(logits.float(), -1)
            mapped = torch.log((probs @ cols).clamp_min(1e-30)).cpu()  # sum of the posteriors of the HF tokens
            for j, k in enumerate(g):
                T = min(frame_lens[k], mapped.shape[1])
                out[k, :T] = mapped[j, :T]
        return out, None, frame_lens


def load(first_pass: str, device: str):
    """``(HFScorer, HFVocab, folder)`` of ``--first_pass hf:DIR_OR_NAME``."""
    name = model_name(first_pass)
    folder = resolve(name)
    try:
        import transformers
        from transformers import AutoConfig, AutoModelForCTC
    except ImportError:
        raise UserError("--first_pass hf:... needs the transformers package (pip install -r requirements.txt)") \
            from None
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    try:
        config = AutoConfig.from_pretrained(folder, local_files_only=True)
        model = AutoModelForCTC.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, KeyError) as err:
        raise UserError(f"--first_pass hf:{name}: {folder} cannot be loaded as a CTC model "
                        f"({type(err).__name__}: {str(err).splitlines()[0][:200]})") from None
    if not hasattr(config, "conv_kernel") or not hasattr(config, "conv_stride"):
        raise UserError(f"--first_pass hf:{name}: {config.model_type} has no wav2vec2 conv front-end "
                        f"(conv_kernel / conv_stride); give a Wav2Vec2ForCTC model")
    id2tok, special, delim = read_vocab(folder, config)
    vocab = build_vocab(id2tok, special, delim, int(config.pad_token_id), int(config.vocab_size),
                        f"{folder} (--first_pass hf:{name})")
    pre = _json(folder / "preprocessor_config.json")
    scorer = HFScorer(model.to(device), vocab, int(pre.get("sampling_rate", 16000)),
                      bool(pre.get("do_normalize", True)))
    return scorer, vocab, folder.resolve()
