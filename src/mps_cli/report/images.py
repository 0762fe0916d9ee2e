"""The report's images: thumbnails embedded as ``data:`` URIs, or links relative to the page; each file once.

A dataset row's image is read out of its webdataset tar shard when that shard is beside the output.
Decoding goes through the scorer's own image reader, so what is refused for scoring is refused here.
"""

from __future__ import annotations

import base64
import io
import os
import tarfile
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from ..constants import IMAGE_EXTENSIONS, MAX_IMAGE_PIXELS
from ..errors import ImageError


@dataclass
class PageImage:
    """How one image appears on the page: its thumbnail or link, or why it cannot be shown."""

    src: str | None  # a data: URI or a relative URL
    full: str | None  # what "enlarge" shows when it differs (the original, linked)
    problem: str | None


class PageImages:
    """Thumbnails (embedded) or relative links, each file done once."""

    def __init__(self, out_dir: Path, thumb: int, fmt: str, link: bool):
        self.out_dir, self.thumb, self.fmt, self.link = Path(os.path.abspath(out_dir)), thumb, fmt, link
        self.done: dict[str, PageImage] = {}
        self.unreadable: dict[str, str] = {}

    def prepare(self, requests: Iterable[tuple[str, Path | None, str | None]]) -> None:
        """Make every (label, origin, shard) image ready, decoding in a few threads."""
        todo: dict[str, tuple] = {}
        for label, origin, shard in requests:
            todo.setdefault(self._key(label, origin, shard), (label, origin, shard))
        todo = {k: v for k, v in todo.items() if k not in self.done}
        # The same file under several names (links, ./a vs a) is encoded once.
        by_file: dict[object, list[str]] = {}
        for key, (label, origin, shard) in todo.items():
            path = None if shard is not None or self.link else _locate(label, origin)
            st = path.stat() if path is not None else None
            ident = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns) if st is not None else key
            by_file.setdefault(ident, []).append(key)
        workers = min(8, os.cpu_count() or 1)
        with ThreadPoolExecutor(max_workers=workers) as pool:
            firsts = [keys[0] for keys in by_file.values()]
            made = pool.map(lambda k: self._make(*todo[k]), firsts)
            for keys, img in zip(by_file.values(), made, strict=True):
                for key in keys:
                    self.done[key] = img

    def get(self, label: str, origin: Path | None, shard: str | None = None) -> PageImage:
        return self.done[self._key(label, origin, shard)]

    @staticmethod
    def _key(label: str, origin: Path | None, shard: str | None) -> str:
        return f"{shard}\0{origin}\0{label}"

    def _make(self, label: str, origin: Path | None, shard: str | None) -> PageImage:
        if shard is not None:
            return self._from_shard(label, shard, origin)
        path = _locate(label, origin)
        if path is None:
            return self._bad(label, f"{label}: no such file")
        if self.link:
            url = _relative_url(path, self.out_dir)
            return PageImage(src=url, full=url, problem=None)
        try:
            from ..engine.preprocess import open_image

            return PageImage(src=self._encode(open_image(path)), full=None, problem=None)
        except ImageError as exc:
            return self._bad(label, str(exc))

    def _from_shard(self, key: str, shard: str, origin: Path | None) -> PageImage:
        """A dataset row's image, read from its webdataset tar shard when that file is here."""
        from PIL import Image as PILImage

        from ..engine.preprocess import open_image

        path = _locate(shard, origin) or _locate(shard, origin.parent if origin else None)
        if path is None or not tarfile.is_tarfile(path):
            return PageImage(src=None, full=None, problem="image is inside its shard")
        try:
            with tarfile.open(path) as tar:
                names = set(tar.getnames())
                member = next((key + ext for ext in sorted(IMAGE_EXTENSIONS) if key + ext in names), None)
                if member is None:
                    return PageImage(src=None, full=None, problem="not found in its shard")
                img = PILImage.open(io.BytesIO(tar.extractfile(member).read()))
                w, h = img.size
                if w * h > MAX_IMAGE_PIXELS:
                    raise ImageError(f"{w}x{h} pixels is over the {MAX_IMAGE_PIXELS // 1_000_000} Mpx limit")
                return PageImage(src=self._encode(open_image(img)), full=None, problem=None)
        except (OSError, tarfile.TarError, ImageError, ValueError, PILImage.DecompressionBombError) as exc:
            return self._bad(f"{shard}:{key}", f"{shard}:{key}: {exc}")

    def _bad(self, label: str, why: str) -> PageImage:
        self.unreadable[label] = why
        return PageImage(src=None, full=None, problem=why)

    def _encode(self, img) -> str:
        from PIL import Image as PILImage

        img = img.copy()
        img.thumbnail((self.thumb, self.thumb), PILImage.Resampling.LANCZOS, reducing_gap=3.0)
        buf = io.BytesIO()
        if self.fmt == "webp":
            img.save(buf, "WEBP", quality=72, method=0)  # method 0: half the time, ~15% bigger
        else:
            img.save(buf, "JPEG", quality=80, optimize=True)
        return f"data:image/{self.fmt};base64,{base64.b64encode(buf.getvalue()).decode('ascii')}"


def _locate(label: str, origin: Path | None) -> Path | None:
    """The file a result names: as given (relative to the working folder), else beside the results file."""
    p = Path(label)
    for cand in ([p] if p.is_absolute() else [p, *([origin / p] if origin else [])]):
        try:
            if cand.is_file():
                return Path(os.path.abspath(cand))  # not resolve(): links keep the user's folder layout
        except OSError:
            continue
    return None


def _relative_url(path: Path, out_dir: Path) -> str:
    rel = os.path.relpath(path, out_dir).replace(os.sep, "/")
    # quote() encodes ':' too, so no path can turn into a scheme such as javascript:
    return "./" + quote(rel) if not rel.startswith("../") else quote(rel)


__all__ = ["PageImage", "PageImages"]
