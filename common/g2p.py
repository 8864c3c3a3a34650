"""Text -> phoneme tokens.

Default G2P: phonemizer's espeak-ng backend with the row's language, keeping stress and punctuation as Matcha's
phonemizer cleaners do (``preserve_punctuation=True, with_stress=True``, whitespace collapsed). A token is one IPA
character; the word-boundary space becomes ``vocab.WORD_SEP``.

Pluggable: ``--g2p module:function`` (``function(text, language) -> str``, or a one-argument text cleaner such as
``matcha.text.cleaners:english_cleaners2``) and ``--symbols module:attr``.
Results are cached per (g2p, language, text) in a JSON file so a re-run only phonemizes new text.
"""
from __future__ import annotations

import importlib
import json
import re
from pathlib import Path
from typing import Callable, Iterable

from common.io import UserError, atomic_write
from common.vocab import symbol_to_token

DEFAULT_G2P = "espeak"


def load_attr(spec: str, what: str):
    """Import ``module:attr`` (e.g. ``matcha.text:to_phonemes``); a clear error when it is not there."""
    if ":" not in spec:
        raise UserError(f"{what} {spec!r}: expected 'module:attribute', e.g. 'matcha.text.symbols:symbols'")
    mod_name, attr = spec.split(":", 1)
    try:
        mod = importlib.import_module(mod_name)
    except ImportError as err:
        raise UserError(f"{what} {spec!r}: cannot import module {mod_name!r} ({err}); "
                        "install it or fix PYTHONPATH") from None
    obj = mod
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise UserError(f"{what} {spec!r}: module {mod_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    return obj


def load_symbols(spec: str | None) -> list[str] | None:
    if not spec:
        return None
    syms = load_attr(spec, "--symbols")
    if isinstance(syms, str) or not hasattr(syms, "__iter__"):
        raise UserError(f"--symbols {spec!r}: expected an ordered list of symbols, got {type(syms).__name__}")
    syms = list(syms)
    if not all(isinstance(s, str) for s in syms):
        raise UserError(f"--symbols {spec!r}: every symbol must be a string")
    return syms


def ipa_to_tokens(ipa: str) -> list[str]:
    """One token per IPA character; whitespace runs become one ``WORD_SEP``."""
    ipa = re.sub(r"\s+", " ", ipa.strip())
    return [symbol_to_token(ch) for ch in ipa]


def check_symbols(tokens: list[str], symbols: list[str], where: str) -> None:
    from common.vocab import token_to_symbol

    allowed = set(symbols)
    for t in tokens:
        if token_to_symbol(t) not in allowed:
            raise UserError(
                f"{where}: IPA symbol {token_to_symbol(t)!r} (U+{ord(token_to_symbol(t)[0]):04X}) is not in --symbols; "
                f"add it to the symbol list, fix the text, or use a G2P whose output the symbols cover"
            )


def espeak_languages() -> dict[str, str]:
    from phonemizer.backend import EspeakBackend

    try:
        return EspeakBackend.supported_languages()
    except RuntimeError as err:
        raise UserError(f"espeak-ng not usable ({err}); install it: apt-get install -y espeak-ng") from None


def _takes_two_args(fn) -> bool:
    """True for ``fn(text, language)``; False for a one-argument cleaner such as Matcha's ``english_cleaners2``."""
    import inspect

    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return True
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return len(positional) >= 2 or any(p.kind == p.VAR_POSITIONAL for p in params)


class G2P:
    """Phonemize many (text, language) pairs with a persistent cache; espeak batches run in parallel."""

    def __init__(self, spec: str | None = None, cache_file: str | Path | None = None, njobs: int = 1):
        self.spec = spec or DEFAULT_G2P
        self.njobs = max(1, int(njobs))
        self.fn: Callable[[str, str], str] | None = None
        if self.spec != DEFAULT_G2P:
            fn = load_attr(self.spec, "--g2p")
            if not callable(fn):
                raise UserError(f"--g2p {self.spec!r} is not callable; give module:function(text, language) -> str")
            self.fn = fn if _takes_two_args(fn) else (lambda text, language: fn(text))
        self.cache_file = Path(cache_file) if cache_file else None
        self.cache: dict[str, str] = {}
        if self.cache_file and self.cache_file.is_file():
            try:
                self.cache = json.loads(self.cache_file.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError):
                self.cache = {}  # a damaged cache is only a cache: rebuild it
        self.hits = 0
        self._langs: dict[str, str] | None = None

    def _key(self, language: str, text: str) -> str:
        return f"{self.spec}\t{language}\t{text}"

    def check_language(self, language: str, where: str) -> None:
        if self.fn is not None:
            return
        if self._langs is None:
            self._langs = espeak_languages()
        if language not in self._langs:
            raise UserError(
                f"{where}: language {language!r} is not known to espeak-ng; use a code from "
                f"'espeak-ng --voices' (e.g. en-us, fr-fr, de) or pass --g2p module:function"
            )

    def phonemize_all(self, items: Iterable[tuple[str, str]], progress: bool = True) -> dict[tuple[str, str], str]:
        """Phonemes for every (language, text); returns a dict keyed by the same pair."""
        pairs = sorted(set(items))
        todo: dict[str, list[str]] = {}
        out = {}
        for lang, text in pairs:
            key = self._key(lang, text)
            if key in self.cache:
                out[(lang, text)] = self.cache[key]
                self.hits += 1
            else:
                todo.setdefault(lang, []).append(text)
        if todo:
            from tqdm import tqdm

            total = sum(len(v) for v in todo.values())
            with tqdm(total=total, desc="phonemize", unit="utt", disable=not progress) as bar:
                for lang, texts in todo.items():
                    for text, ph in zip(texts, self._run(lang, texts)):
                        self.cache[self._key(lang, text)] = ph
                        out[(lang, text)] = ph
                    bar.update(len(texts))
            self.save()
        return out

    def _run(self, lang: str, texts: list[str]) -> list[str]:
        if self.fn is not None:
            result = []
            for t in texts:
                ph = self.fn(t, lang)
                if not isinstance(ph, str):
                    raise UserError(f"--g2p {self.spec!r} returned {type(ph).__name__} for {t!r}; it must return str")
                result.append(ph)
            return result
        from phonemizer.backend import EspeakBackend

        backend = EspeakBackend(lang, preserve_punctuation=True, with_stress=True, language_switch="remove-flags")
        # phonemizer splits the list into njobs chunks and runs them in parallel processes
        njobs = self.njobs if len(texts) >= 8 * self.njobs else 1
        res = backend.phonemize(list(texts), njobs=njobs, strip=True)
        return [re.sub(r"\s+", " ", r).strip() for r in res]

    def save(self) -> None:
        if self.cache_file:
            with atomic_write(self.cache_file) as fh:
                json.dump(self.cache, fh, ensure_ascii=False)
