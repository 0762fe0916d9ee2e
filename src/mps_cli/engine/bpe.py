"""CLIP's byte-level BPE, on the vocabulary file that open_clip_torch ships.

The ids are exactly open_clip's ``SimpleTokenizer().encode`` (the tests compare them on a
corpus). It lives here rather than being imported from open_clip because importing any
open_clip module runs its package ``__init__``, which imports torchvision and torch._dynamo:
about 2.3 s of every ``mps`` command's start-up on a small CPU, for one vocabulary file.
"""

from __future__ import annotations

import gzip
import html
import importlib.util
from functools import lru_cache
from pathlib import Path

from ..errors import MPSError

VOCAB_FILE = "bpe_simple_vocab_16e6.txt.gz"
#: The merges CLIP uses: the vocabulary is 256 bytes, 256 word-final bytes, these merges, SOT and EOT.
N_MERGES = 49152 - 256 - 2
SPECIAL_TOKENS = ("<start_of_text>", "<end_of_text>")
_END = "</w>"


def vocab_path() -> Path:
    """Where open_clip_torch keeps CLIP's BPE merges; found without importing open_clip."""
    spec = importlib.util.find_spec("open_clip")
    folders = list(spec.submodule_search_locations or []) if spec else []
    for folder in folders:
        path = Path(folder) / VOCAB_FILE
        if path.is_file():
            return path
    raise MPSError(f"CLIP's BPE vocabulary ({VOCAB_FILE}) was not found: open_clip_torch is not installed "
                   "or is damaged (pip install open_clip_torch)")


def _byte_alphabet() -> dict[int, str]:
    """One printable character per byte value: printable Latin-1 bytes stand for themselves,
    the others (controls, space, soft hyphen) are moved past 255 in order."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in keep}
    moved = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + moved)
            moved += 1
    return table


class BPE:
    """Text to CLIP token ids (no SOT/EOT layout: :class:`~mps_cli.engine.preprocess.Tokenizer` adds that)."""

    def __init__(self, path: Path | None = None):
        import regex

        merges = [tuple(line.split()) for line in
                  gzip.open(path or vocab_path()).read().decode("utf-8").split("\n")[1:N_MERGES + 1]]
        self._bytes = _byte_alphabet()
        symbols = list(self._bytes.values())
        vocab = [*symbols, *(s + _END for s in symbols), *("".join(m) for m in merges), *SPECIAL_TOKENS]
        self.ids = {token: i for i, token in enumerate(vocab)}
        self._rank = {pair: i for i, pair in enumerate(merges)}
        # Words are runs of letters, single digits, runs of other non-space characters, or the
        # English contractions; the special tokens' text is matched whole, as in CLIP.
        self._words = regex.compile(
            "|".join(SPECIAL_TOKENS) + r"""|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
            regex.IGNORECASE,
        )
        self._merge = lru_cache(maxsize=65536)(self._merge_word)

    @staticmethod
    def clean(text: str) -> str:
        """CLIP's normalisation: ftfy, HTML entities undone twice, whitespace runs to one space, lower case."""
        import ftfy

        text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
        return " ".join(text.split()).lower()

    def encode(self, text: str) -> list[int]:
        """The token ids of ``text``."""
        out: list[int] = []
        for word in self._words.findall(self.clean(text)):
            if word in SPECIAL_TOKENS:
                out.append(self.ids[word])
                continue
            symbols = "".join(self._bytes[b] for b in word.encode("utf-8"))
            out.extend(self.ids[s] for s in self._merge(symbols))
        return out

    def _merge_word(self, symbols: str) -> tuple[str, ...]:
        """Apply merges to one word, always the best-ranked pair present, every occurrence left to right."""
        parts = [*symbols[:-1], symbols[-1] + _END]
        rank = self._rank
        while len(parts) > 1:
            best = min(zip(parts, parts[1:], strict=False), key=lambda pair: rank.get(pair, N_MERGES))
            if best not in rank:
                break
            merged: list[str] = []
            i = 0
            while i < len(parts):
                if i + 1 < len(parts) and parts[i] == best[0] and parts[i + 1] == best[1]:
                    merged.append(parts[i] + parts[i + 1])
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        return tuple(parts)
