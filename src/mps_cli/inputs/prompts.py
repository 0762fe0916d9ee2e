"""Where prompts come from: a prompts file, caption sidecars, or the metadata generators embed."""

from __future__ import annotations

import csv
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from ..errors import PromptError

SIDECAR_SUFFIXES = (".txt", ".caption")
#: The prompts-file formats read_prompt_file tells apart by name (any other name is read as JSONL).
PROMPT_FILE_SUFFIXES = (".jsonl", ".json", ".csv", ".tsv")
_SAMPLERS = ("KSampler", "KSamplerAdvanced", "SamplerCustom", "SamplerCustomAdvanced")
_CONDITIONING_INPUTS = ("positive", "conditioning", "conditioning_to", "conditioning_1", "conditioning_from",
                        "conditioning_2", "guider", "base_positive")
_STRING_INPUTS = ("text", "string", "value", "text_g", "prompt", "positive", "text_positive", "wildcard_text",
                  "populated_text")
# Column / key names: ours first, then Hugging Face imagefolder's metadata.jsonl / metadata.csv.
_IMAGE_KEYS = ("image", "file_name")
_PROMPT_KEYS = ("prompt", "text")


class MissingPromptError(PromptError):
    """The prompt source has no prompt for this image (as opposed to one it cannot read)."""


def text_problem(text: str) -> str | None:
    """Why ``text`` cannot be a prompt (it is not encodable text), or None when it can."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        return f"holds U+{ord(text[exc.start]):04X} at character {exc.start + 1}, which is not text (a lone surrogate)"
    return None


def _loads(raw: str):
    """``json.loads``, with absurdly deep nesting treated as invalid JSON."""
    try:
        return json.loads(raw)
    except RecursionError:
        raise json.JSONDecodeError("nested too deeply", raw[:20], 0) from None


def _first(obj: dict, keys: tuple[str, ...]):
    for k in keys:
        if k in obj:
            return obj[k]
    return None


@dataclass(frozen=True)
class PromptEntry:
    """One line of a prompts file: the image as written, where it is, and its prompt (or an error)."""

    image: str
    path: Path | None
    prompt: str | None
    error: str | None = None


def read_prompt_file(path: str | os.PathLike) -> list[PromptEntry]:
    """Read a prompts file: JSONL (``{"image", "prompt"}`` per line), a JSON array of such objects
    (what ``mps score --json`` prints), or CSV/TSV (``image``, ``prompt`` columns). Hugging Face
    imagefolder names (``file_name``, ``text``) are read too.

    Relative image paths resolve against the file's folder. A bad line becomes an entry with
    ``error`` set; a file that cannot be read at all raises :class:`PromptError`.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise PromptError(f"{path}: prompts file not found") from None
    except IsADirectoryError:
        raise PromptError(f"{path}: is a directory, not a prompts file") from None
    except UnicodeDecodeError as exc:
        raise PromptError(f"{path}: not UTF-8 text; save the prompts file as UTF-8") from exc
    except ValueError as exc:  # a NUL in the path
        raise PromptError(f"{str(path)!r}: not a usable file name ({exc})") from exc
    except OSError as exc:
        raise PromptError(f"{path}: cannot read prompts file ({exc.strerror or exc})") from exc
    base = path.parent
    if path.suffix.lower() in (".csv", ".tsv"):
        entries = _read_csv(path, text, base, "\t" if path.suffix.lower() == ".tsv" else ",")
    elif path.suffix.lower() == ".json" or _is_json_array(text):
        entries = _read_json_array(path, text, base)
    else:
        entries = _read_jsonl(path, text, base)
    if not entries:
        raise PromptError(f"{path}: no entries (expected JSONL lines, a JSON array, or CSV rows with image and prompt)")
    return entries


def _entry(base: Path, image, prompt, where: str) -> PromptEntry:
    if not isinstance(image, str) or not image.strip():
        return PromptEntry(image=where, path=None, prompt=None, error=f"{where}: missing 'image'")
    if text_problem(image) or "\0" in image:
        return PromptEntry(image=where, path=None, prompt=None, error=f"{where}: 'image' is not a usable file name")
    if not isinstance(prompt, str):
        what = "missing 'prompt'" if prompt is None else "'prompt' is not a string"
        return PromptEntry(image=image, path=base / image, prompt=None, error=f"{where}: {what}")
    problem = text_problem(prompt)
    if problem:
        return PromptEntry(image=image, path=base / image, prompt=None, error=f"{where}: the prompt {problem}")
    return PromptEntry(image=image, path=base / os.path.expanduser(image), prompt=prompt)


def _object_entry(base: Path, obj, where: str) -> PromptEntry:
    if not isinstance(obj, dict):
        return PromptEntry(image=where, path=None, prompt=None,
                           error=f"{where}: expected an object with image and prompt")
    image, prompt = _first(obj, _IMAGE_KEYS), _first(obj, _PROMPT_KEYS)
    if prompt is None and isinstance(obj.get("error"), str) and isinstance(image, str):
        # A failed row of an earlier run's --json output: it has no prompt to reuse.
        return PromptEntry(image=image, path=base / image, prompt=None,
                           error=f"{where}: no prompt (this entry records an earlier failure)")
    return _entry(base, image, prompt, where)


def _is_json_array(text: str) -> bool:
    """Whether the whole text is one JSON array (a JSONL file may start with a line that is one)."""
    if not text.lstrip().startswith("["):
        return False
    try:
        return isinstance(_loads(text), list)
    except json.JSONDecodeError:
        return False


def _read_json_array(path: Path, text: str, base: Path) -> list[PromptEntry]:
    try:
        data = _loads(text)
    except json.JSONDecodeError as exc:
        raise PromptError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from exc
    if not isinstance(data, list):
        raise PromptError(f"{path}: expected a JSON array of objects with image and prompt")
    return [_object_entry(base, obj, f"{path}[{n}]") for n, obj in enumerate(data)]


def _read_jsonl(path: Path, text: str, base: Path) -> list[PromptEntry]:
    out = []
    for n, line in enumerate(text.split("\n"), 1):  # not splitlines(): U+2028 is text in JSON
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            obj = _loads(line)
        except json.JSONDecodeError as exc:
            out.append(PromptEntry(image=where, path=None, prompt=None, error=f"{where}: bad JSON ({exc.msg})"))
            continue
        out.append(_object_entry(base, obj, where))
    return out


def _read_csv(path: Path, text: str, base: Path, delimiter: str) -> list[PromptEntry]:
    # A StringIO, not splitlines(): a quoted prompt may span lines, and its line breaks are part of it.
    reader = csv.DictReader(io.StringIO(text), delimiter=delimiter)
    try:
        fields = [f.strip() for f in reader.fieldnames or []]
    except csv.Error as exc:
        raise PromptError(f"{path}: not valid CSV ({exc})") from None
    image_col = next((c for c in _IMAGE_KEYS if c in fields), "image")
    prompt_col = next((c for c in _PROMPT_KEYS if c in fields), "prompt")
    missing = [c for c in (image_col, prompt_col) if c not in fields]
    if missing:
        raise PromptError(
            f"{path}: missing column {', '.join(repr(m) for m in missing)} "
            f"(found: {', '.join(fields) or 'no header'}); the header needs image and prompt"
        )
    out = []
    try:
        for row in reader:
            row = {(k or "").strip(): v for k, v in row.items()}
            out.append(_entry(base, row.get(image_col), row.get(prompt_col), f"{path}:{reader.line_num}"))
    except csv.Error as exc:
        raise PromptError(f"{path}:{reader.line_num}: not valid CSV ({exc})") from None
    return out


def sidecar_prompt(image: str | os.PathLike) -> str:
    """The caption beside an image, as training datasets keep them: same stem, ``.txt`` or ``.caption``."""
    p = Path(image)
    for suffix in SIDECAR_SUFFIXES:
        cand = p.with_suffix(suffix)
        if cand.is_file():
            try:
                text = cand.read_text(encoding="utf-8-sig").strip()
            except UnicodeDecodeError as exc:
                raise PromptError(f"{cand}: not UTF-8 text; save the caption file as UTF-8") from exc
            except OSError as exc:
                raise PromptError(f"{cand}: cannot read caption ({exc.strerror or exc})") from exc
            if not text:
                raise MissingPromptError(f"{cand}: caption file is empty")
            return text
    raise MissingPromptError(f"{image}: no caption file beside it ({p.stem}.txt or {p.stem}.caption)")


def metadata_prompt(image: str | os.PathLike) -> str:
    """The prompt a generator embedded in the image.

    Understands AUTOMATIC1111/Forge ``parameters`` (PNG text or EXIF UserComment in JPEG/WebP),
    ComfyUI's ``prompt`` graph, InvokeAI, Fooocus and NovelAI metadata.
    """
    try:
        with Image.open(image) as img:
            info = dict(img.info)
            exif = img.getexif()
            user_comment = exif.get_ifd(0x8769).get(0x9286) if exif else None
            description = exif.get(0x010E) if exif else None
    except FileNotFoundError:
        raise PromptError(f"{image}: no such file") from None
    except Image.DecompressionBombError as exc:
        raise PromptError(f"{image}: image is too large to open safely (decompression bomb?)") from exc
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        # ValueError: PIL refuses a text chunk that inflates past its limit.
        detail = " ".join(str(exc).split()) or type(exc).__name__
        raise PromptError(f"{image}: cannot read metadata ({detail})") from exc
    try:
        found = _prompt_from_info(info, user_comment, description)
    except (RecursionError, TypeError, AttributeError, ValueError, KeyError) as exc:
        # Metadata is whatever a generator (or anyone) wrote: a shape we do not expect is unreadable, not a bug.
        raise PromptError(f"{image}: metadata is malformed ({type(exc).__name__})") from exc
    if found is None or not found.strip():
        raise MissingPromptError(
            f"{image}: no generator prompt in its metadata (looked for A1111 parameters, ComfyUI, "
            "InvokeAI, Fooocus, NovelAI)"
        )
    problem = text_problem(found)
    if problem:
        raise PromptError(f"{image}: the prompt in its metadata {problem}")
    return found.strip()


def _text(value) -> str | None:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return value if isinstance(value, str) else None


def _prompt_from_info(info: dict, user_comment, description) -> str | None:
    params = _text(info.get("parameters"))
    if params and params.strip():
        if params.lstrip().startswith("{"):
            try:
                data = _loads(params)
                if isinstance(data, dict) and isinstance(data.get("prompt"), str):
                    return data["prompt"]  # Fooocus writes its parameters as JSON
            except json.JSONDecodeError:
                pass
        return a1111_prompt(params)
    comfy = _text(info.get("prompt"))
    if comfy:
        found = comfy_prompt(comfy)
        if found:
            return found
    invoke = _text(info.get("invokeai_metadata"))
    if invoke:
        found = _json_field(invoke, ("positive_prompt",))
        if found:
            return found
    legacy = _text(info.get("sd-metadata"))
    if legacy:
        try:
            p = _loads(legacy).get("image", {}).get("prompt")
            if isinstance(p, list):
                p = " ".join(x["prompt"] for x in p if isinstance(x, dict) and isinstance(x.get("prompt"), str))
            if isinstance(p, str) and p:
                return p
        except (json.JSONDecodeError, AttributeError):
            pass
    comment = _text(info.get("Comment"))
    if comment:
        found = _json_field(comment, ("prompt",))
        if found:
            return found
    if _text(info.get("Description")):
        return _text(info.get("Description"))
    if user_comment:
        text = decode_user_comment(user_comment)
        if text and text.strip():
            return a1111_prompt(text)
    return _text(description)


def _json_field(raw: str, keys: tuple[str, ...]) -> str | None:
    try:
        data = _loads(raw)
    except json.JSONDecodeError:
        return None
    if isinstance(data, dict):
        for k in keys:
            if isinstance(data.get(k), str) and data[k]:
                return data[k]
    return None


def a1111_prompt(parameters: str) -> str:
    """AUTOMATIC1111's ``parameters`` text: the prompt is everything before ``Negative prompt:``
    (or, without one, before the final ``Steps:`` settings line)."""
    lines = parameters.replace("\r\n", "\n").split("\n")
    for i, line in enumerate(lines):
        if line.startswith("Negative prompt:"):
            return "\n".join(lines[:i]).strip()
    for i in range(len(lines) - 1, -1, -1):
        if lines[i].startswith("Steps: "):
            return "\n".join(lines[:i]).strip()
    return parameters.strip()


def decode_user_comment(raw) -> str | None:
    """EXIF UserComment: an 8-byte charset prefix (UNICODE, ASCII) then the text."""
    if isinstance(raw, str):
        return raw
    if not isinstance(raw, bytes) or len(raw) < 8:
        return None
    head, body = raw[:8], raw[8:]
    if head.startswith(b"UNICODE"):
        # Writers disagree on byte order; the zero high bytes of ASCII text tell which.
        even_zeros = body[0::2].count(0)
        odd_zeros = body[1::2].count(0)
        return body.decode("utf-16-be" if even_zeros >= odd_zeros else "utf-16-le", "replace").rstrip("\x00")
    return body.decode("utf-8", "replace").rstrip("\x00")


def comfy_prompt(raw: str) -> str | None:
    """The positive text of the first sampler's conditioning in a ComfyUI API ``prompt`` graph."""
    try:
        graph = _loads(raw)
    except json.JSONDecodeError:
        return None
    if not isinstance(graph, dict):
        return None
    comfy = _ComfyGraph(graph)
    for key in sorted(graph, key=lambda k: (0, int(k)) if k.isdecimal() else (1, k)):
        n = graph[key]
        if not isinstance(n, dict) or n.get("class_type") not in _SAMPLERS:
            continue
        inputs = comfy.inputs_of(n)
        for k in ("positive", "guider"):
            if k in inputs:
                found = comfy.text_of(inputs[k])
                if found:
                    return found
    return None


class _ComfyGraph:
    """A ComfyUI API graph: nodes by id, each input a value or a ``[node id, output]`` reference."""

    def __init__(self, graph: dict):
        self.graph = graph

    def node(self, ref) -> dict | None:
        if isinstance(ref, list) and ref and isinstance(ref[0], (str, int)):
            n = self.graph.get(str(ref[0]))
            return n if isinstance(n, dict) else None
        return None

    @staticmethod
    def inputs_of(n: dict) -> dict:
        inputs = n.get("inputs")
        return inputs if isinstance(inputs, dict) else {}

    def string_of(self, value, depth: int = 0) -> str | None:
        """A string input, followed through the nodes that pass text along (at most 20 deep)."""
        if isinstance(value, str):
            return value
        n = self.node(value)
        if n is None or depth > 20:
            return None
        inputs = self.inputs_of(n)
        for key in _STRING_INPUTS:
            if key in inputs:
                s = self.string_of(inputs[key], depth + 1)
                if s:
                    return s
        return None

    def text_of(self, ref, depth: int = 0) -> str | None:
        """The text of a conditioning input: its encoder's text, or a combined conditioning's first text."""
        n = self.node(ref)
        if n is None or depth > 20:
            return None
        inputs = self.inputs_of(n)
        for key in ("text", "text_g", "text_l", "prompt"):
            if key in inputs:
                s = self.string_of(inputs[key])
                if s:
                    return s
        for key in _CONDITIONING_INPUTS:
            if key in inputs:
                s = self.text_of(inputs[key], depth + 1)
                if s:
                    return s
        return None
