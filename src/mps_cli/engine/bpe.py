"""CLIP's byte-level BPE, on CLIP's vocabulary file, shipped beside this module.

The ids are exactly open_clip's ``SimpleTokenizer().encode`` (the tests compare them on a
corpus, and hold the vocabulary file to open_clip_torch's copy byte for byte). Neither lives in
open_clip for us: importing any open_clip module runs its package ``__init__``, which imports
torchvision and torch._dynamo (about 2.3 s of every ``mps`` command's start-up on a small CPU),
and depending on open_clip_torch makes pip install torchvision, timm and, over a CPU build of
torch, the CUDA one. The vocabulary is OpenAI's, MIT-licensed (``CLIP-LICENSE.txt`` beside it).
"""

from __future__ import annotations

import gzip
import html
from functools import lru_cache
from pathlib import Path

from ..constants import DISTRIBUTION
from ..errors import MPSError

VOCAB_FILE = "bpe_simple_vocab_16e6.txt.gz"
#: The merges CLIP uses: the vocabulary is 256 bytes, 256 word-final bytes, these merges, SOT and EOT.
N_MERGES = 49152 - 256 - 2
SPECIAL_TOKENS = ("<start_of_text>", "<end_of_text>")
_END = "</w>"


def vocab_path() -> Path:
    """CLIP's BPE merges, shipped in this package."""
    path = Path(__file__).with_name(VOCAB_FILE)
    if not path.is_file():
        raise MPSError(f"CLIP's BPE vocabulary ({path}) is missing: this installation of {DISTRIBUTION} is "
                       f"incomplete; reinstall it (pip install --force-reinstall {DISTRIBUTION})")
    return path


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
