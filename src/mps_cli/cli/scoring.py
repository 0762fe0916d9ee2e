"""``mps score``, ``mps compare`` and ``mps rank``."""

from __future__ import annotations

import csv
import io
import json
import os
import sys
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Annotated, Iterable, Iterator, List, Optional

import typer

from ..constants import CUSTOM_KEY, DIMENSIONS, IMAGE_EXTENSIONS
from ..errors import PromptError
from .app import (
    DEFAULT_THRESHOLD, BatchSize, Condition, Config, Device, Dims, Dtype, Exit, MaskThreshold, Offline,
    Revision, ServerToken, ServerUrl, Weights, app, fail, handle_errors, open_scorer, say,
)
from .report_cmd import Html, write_html


class PromptFrom(str, Enum):
    sidecar = "sidecar"
    metadata = "metadata"


Prompt = Annotated[Optional[str], typer.Option(
    "--prompt", "-p", rich_help_panel="Prompts", help="The prompt, for every image.")]
PromptsFile = Annotated[Optional[Path], typer.Option(
    "--prompts", rich_help_panel="Prompts",
    help="JSONL ({\"image\": ..., \"prompt\": ...} per line) or CSV (image, prompt columns); relative "
    "image paths resolve against the file's folder, and the images are the ones it lists.")]
PromptFromOpt = Annotated[Optional[PromptFrom], typer.Option(
    "--prompt-from", rich_help_panel="Prompts",
    help="sidecar: the caption file beside each image (same stem, .txt or .caption); metadata: the "
    "prompt generators embed (AUTOMATIC1111, ComfyUI, InvokeAI, Fooocus, NovelAI).")]
AsJson = Annotated[bool, typer.Option("--json", rich_help_panel="Output", help="One JSON document.")]
AsJsonl = Annotated[bool, typer.Option("--jsonl", rich_help_panel="Output",
                                       help="One JSON object per line, streamed.")]
AsCsv = Annotated[bool, typer.Option("--csv", rich_help_panel="Output", help="CSV with a header row.")]
Recursive = Annotated[bool, typer.Option("--recursive", "-r", rich_help_panel="Inputs",
                                         help="Descend into sub-folders of folder arguments.")]


@dataclass
class Item:
    """One input to score: its label as given, where it is, its prompt, or why it cannot be scored."""

    label: str
    path: Path | None
    prompt: str | None = None
    error: str | None = None


def _output_mode(as_json: bool, as_jsonl: bool, as_csv: bool) -> str:
    chosen = [m for m, on in (("json", as_json), ("jsonl", as_jsonl), ("csv", as_csv)) if on]
    if len(chosen) > 1:
        raise fail(f"choose one output format, not {' and '.join('--' + c for c in chosen)}", Exit.USAGE)
    return chosen[0] if chosen else "table"


def _expand(args: Iterable[str], recursive: bool) -> list[Item]:
    items: list[Item] = []
    for arg in args:
        if arg == "-":
            for line in sys.stdin.read().splitlines():
                if line.strip():
                    items.append(Item(label=line.strip(), path=Path(line.strip())))
            continue
        p = Path(arg)
        if p.is_dir():
            walker = sorted(p.rglob("*")) if recursive else sorted(p.iterdir())
            found = [f for f in walker if f.suffix.lower() in IMAGE_EXTENSIONS and f.is_file()]
            if not found:
                kinds = ", ".join(sorted(e.lstrip(".") for e in IMAGE_EXTENSIONS))
                hint = "" if recursive else "; use --recursive for sub-folders"
                items.append(Item(label=arg, path=None, error=f"{arg}: no images in this folder ({kinds}){hint}"))
            for f in found:
                items.append(Item(label=os.path.join(arg, str(f.relative_to(p))), path=f))
        else:
            items.append(Item(label=arg, path=p))
    return items


def _collect(images: List[str], prompt: Optional[str], prompts_file: Optional[Path],
             prompt_from: Optional[PromptFrom], recursive: bool) -> list[Item]:
    sources = [n for n, on in (("--prompt", prompt is not None), ("--prompts", prompts_file is not None),
                               ("--prompt-from", prompt_from is not None)) if on]
    if not sources:
        raise fail("no prompt: give --prompt TEXT, --prompts FILE or --prompt-from sidecar|metadata", Exit.USAGE)
    if len(sources) > 1:
        raise fail(f"choose one prompt source, not {' and '.join(sources)}", Exit.USAGE)
    if prompts_file is not None:
        if images:
            raise fail("--prompts FILE lists the images itself; drop the image arguments", Exit.USAGE)
        try:
            from ..prompts import read_prompt_file

            entries = read_prompt_file(prompts_file)
        except PromptError as exc:
            raise fail(str(exc), Exit.USAGE) from None
        return [Item(label=e.image, path=e.path, prompt=e.prompt, error=e.error) for e in entries]
    if not images:
        raise fail("no images given (paths, folders, or - to read paths from stdin)", Exit.USAGE)
    items = _expand(images, recursive)
    if prompt is not None:
        for it in items:
            it.prompt = prompt
    else:
        from ..prompts import metadata_prompt, sidecar_prompt

        read = sidecar_prompt if prompt_from is PromptFrom.sidecar else metadata_prompt
        for it in items:
            if it.error is None:
                try:
                    it.prompt = read(it.path)
                except PromptError as exc:
                    it.error = str(exc)
    return items


def _results(scorer, items: list[Item], dims, condition, threshold, batch_size, progress) -> Iterator:
    """ScoreResults in input order; items that failed before scoring come back as errors."""
    from ..scorer import ScoreResult

    good = [it for it in items if it.error is None]
    stream = scorer.iter_score([it.path for it in good], [it.prompt for it in good], dims=dims,
                               condition=condition, mask_threshold=threshold, batch_size=batch_size,
                               progress=progress)
    for it in items:
        if it.error is not None:
            if progress:
                progress(1)
            yield ScoreResult(image=it.label, prompt=it.prompt, error=it.error)
        else:
            r = next(stream)
            yield ScoreResult(image=it.label, prompt=r.prompt, scores=r.scores, kept_tokens=r.kept_tokens,
                              prompt_truncated=r.prompt_truncated, error=r.error)


def _record(r, rank: int | None = None) -> dict:
    if r.error is not None:
        return {"image": r.image, "error": r.error}
    out = {"image": r.image, "prompt": r.prompt, "scores": dict(r.scores)}
    if rank is not None:
        out["rank"] = rank
    return out


class _Writer:
    """Writes results to stdout in the chosen format; streaming formats flush per line."""

    def __init__(self, mode: str, keys: list[str], rank: bool = False):
        self.mode, self.keys, self.rank = mode, keys, rank
        self.rows: list[tuple] = []
        self.docs: list[dict] = []
        self.csv_header_done = False
        self.warned_truncation = False
        self.kept: list[dict] | None = None  # --html: every record, for the report
        self.scorer = None

    def add(self, r, rank: int | None = None) -> None:
        if self.kept is not None:
            self.kept.append(_record(r, rank))
        if r.error is not None:
            say(f"mps: error: {r.error}")
        elif r.prompt_truncated and not self.warned_truncation:
            self.warned_truncation = True
            say(f"mps: warning: the prompt for {r.image} is longer than 77 tokens; the model reads only "
                "the first 77 (further truncation warnings suppressed)")
        if self.mode == "jsonl":
            _emit(json.dumps(_record(r, rank), ensure_ascii=False) + "\n")
        elif self.mode == "json":
            self.docs.append(_record(r, rank))
        elif self.mode == "csv":
            buf = io.StringIO()
            w = csv.writer(buf, lineterminator="\n")
            if not self.csv_header_done:
                w.writerow((["rank"] if self.rank else []) + ["image", "prompt", *self.keys, "error"])
                self.csv_header_done = True
            scores = [("" if r.error else f"{r.scores.get(k, float('nan')):.6f}") for k in self.keys]
            w.writerow(([rank if rank is not None else ""] if self.rank else [])
                       + [r.image, r.prompt or "", *scores, r.error or ""])
            _emit(buf.getvalue())
        elif r.error is None:
            self.rows.append((rank, r))

    def close(self, title: str | None = None) -> None:
        if self.mode == "json":
            _emit(json.dumps(self.docs, ensure_ascii=False, indent=2) + "\n")
        elif self.mode == "table" and self.rows:
            from rich.console import Console
            from rich.table import Table

            prompts = {r.prompt for _, r in self.rows}
            table = Table(title=title, title_justify="left")
            if self.rank:
                table.add_column("#", justify="right")
            table.add_column("image", overflow="fold")
            if len(prompts) > 1:
                table.add_column("prompt", overflow="ellipsis", max_width=40)
            for k in self.keys:
                table.add_column(k, justify="right")
            for rank, r in self.rows:
                cells = ([str(rank)] if self.rank else []) + [r.image]
                if len(prompts) > 1:
                    cells.append(r.prompt or "")
                cells += [f"{r.scores[k]:.3f}" for k in self.keys]
                table.add_row(*cells)
            if len(prompts) == 1 and title is None:
                table.caption = f"prompt: {next(iter(prompts))}"
                table.caption_justify = "left"
            Console(soft_wrap=False).print(table)


def _emit(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def _keys(dims: Optional[List[str]], condition: Optional[str]) -> list[str]:
    from ..scorer import resolve_conditions

    try:
        return [k for k, _ in resolve_conditions(dims, condition)]
    except ValueError as exc:
        raise fail(str(exc), Exit.USAGE) from None


class _Progress:
    """A Rich progress bar on stderr, only for a terminal and work long enough to need one."""

    def __init__(self, total: int, batch_size: int):
        self.bar = None
        if sys.stderr.isatty() and total > batch_size:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

            self.bar = Progress("[progress.description]{task.description}", BarColumn(), MofNCompleteColumn(),
                                TimeRemainingColumn(), console=Console(stderr=True), transient=True)
            self.task = self.bar.add_task("scoring", total=total)

    def __enter__(self):
        if self.bar:
            self.bar.start()
        return self.advance if self.bar else None

    def advance(self, n: int) -> None:
        self.bar.advance(self.task, n)

    def __exit__(self, *exc):
        if self.bar:
            self.bar.stop()


def _quiet_broken_pipe() -> None:
    # The reader went away (`| head`): stop quietly, and keep Python's exit-time flush silent.
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())


@app.command()
def score(
    images: Annotated[Optional[List[str]], typer.Argument(
        help="Image files, folders, or - to read paths from stdin.", show_default=False)] = None,
    prompt: Prompt = None, prompts: PromptsFile = None, prompt_from: PromptFromOpt = None,
    dim: Dims = None, condition: Condition = None, mask_threshold: MaskThreshold = DEFAULT_THRESHOLD,
    recursive: Recursive = False,
    as_json: AsJson = False, as_jsonl: AsJsonl = False, as_csv: AsCsv = False, html: Html = None,
    weights: Weights = None, config: Config = None, revision: Revision = None, offline: Offline = False,
    device: Device = "auto", dtype: Dtype = "auto", batch_size: BatchSize = None,
    server: ServerUrl = None, token: ServerToken = None,
) -> None:
    """Score images for their prompts: one result per image.

    Exit codes: 0 all scored, 1 some inputs failed (the rest are still printed), 2 usage error,
    3 weights/config problem, 4 network or cache problem.
    """
    mode = _output_mode(as_json, as_jsonl, as_csv)
    keys = _keys(dim, condition)
    items = _collect(images or [], prompt, prompts, prompt_from, recursive)
    writer = _Writer(mode, keys)
    writer.kept = [] if html else None
    failed = _run(items, keys, dim, condition, mask_threshold, weights, config, revision, offline, device,
                  dtype, batch_size, writer, server=server, token=token)
    write_html(html, writer.kept, writer.scorer, mask_threshold, keys)
    raise typer.Exit(int(Exit.PARTIAL if failed else Exit.OK))


def _run(items, keys, dim, condition, threshold, weights, config, revision, offline, device, dtype,
         batch_size, writer: _Writer, rank_by: str | None = None, top: int | None = None,
         server: str | None = None, token: str | None = None) -> int:
    """Score items and write them; returns how many failed."""
    failed = 0
    with handle_errors():
        scorer = None
        if any(it.error is None for it in items):
            scorer = open_scorer(server, token, weights, config, device, dtype, revision, offline, batch_size)
        writer.scorer = scorer
        try:
            with _Progress(len(items), scorer.batch_size if scorer else 1) as progress:
                if scorer is None:
                    results = (_error_result(it) for it in items)
                else:
                    results = _results(scorer, items, dim, condition, threshold, batch_size, progress)
                if rank_by is None:
                    for r in results:
                        failed += r.error is not None
                        writer.add(r)
                else:
                    done = list(results)
                    ok = sorted((r for r in done if r.error is None), key=lambda r: -r.scores[rank_by])
                    bad = [r for r in done if r.error is not None]
                    failed = len(bad)
                    for i, r in enumerate(ok[:top] if top else ok, 1):
                        writer.add(r, rank=i)
                    for r in bad:
                        writer.add(r)
            writer.close()
        except BrokenPipeError:
            _quiet_broken_pipe()
            raise typer.Exit(int(Exit.OK))
    return failed


def _error_result(it: Item):
    from ..scorer import ScoreResult

    return ScoreResult(image=it.label, prompt=it.prompt, error=it.error)


@app.command()
def rank(
    images: Annotated[Optional[List[str]], typer.Argument(
        help="A folder, image files, or - to read paths from stdin.", show_default=False)] = None,
    prompt: Prompt = None, prompts: PromptsFile = None, prompt_from: PromptFromOpt = None,
    by: Annotated[Optional[str], typer.Option(
        "--by", rich_help_panel="Scoring", help="Dimension to order by (default: the first requested).")] = None,
    top: Annotated[Optional[int], typer.Option(
        "--top", "-k", min=1, rich_help_panel="Output", help="Show only the best K.")] = None,
    dim: Dims = None, condition: Condition = None, mask_threshold: MaskThreshold = DEFAULT_THRESHOLD,
    recursive: Recursive = False,
    as_json: AsJson = False, as_jsonl: AsJsonl = False, as_csv: AsCsv = False, html: Html = None,
    weights: Weights = None, config: Config = None, revision: Revision = None, offline: Offline = False,
    device: Device = "auto", dtype: Dtype = "auto", batch_size: BatchSize = None,
    server: ServerUrl = None, token: ServerToken = None,
) -> None:
    """Rank images best first by one dimension; failed inputs are listed after the ranking."""
    mode = _output_mode(as_json, as_jsonl, as_csv)
    if by is not None:
        if by not in (*DIMENSIONS, CUSTOM_KEY):
            raise typer.BadParameter(f"{by!r} is not one of {', '.join(DIMENSIONS)}, custom", param_hint="--by")
        if by == CUSTOM_KEY and condition is None:
            raise typer.BadParameter("--by custom needs --condition", param_hint="--by")
        if by != CUSTOM_KEY and by not in (dim or []) and "all" not in (dim or []):
            dim = [*(dim or ([] if condition else ["overall"])), by]
    keys = _keys(dim, condition)
    rank_by = by or keys[0]
    items = _collect(images or [], prompt, prompts, prompt_from, recursive)
    writer = _Writer(mode, keys, rank=True)
    writer.kept = [] if html else None
    failed = _run(items, keys, dim, condition, mask_threshold, weights, config, revision, offline, device,
                  dtype, batch_size, writer, rank_by=rank_by, top=top, server=server, token=token)
    write_html(html, writer.kept, writer.scorer, mask_threshold, keys)
    raise typer.Exit(int(Exit.PARTIAL if failed else Exit.OK))


@app.command()
def compare(
    a: Annotated[str, typer.Argument(help="Image A.", show_default=False)],
    b: Annotated[str, typer.Argument(help="Image B.", show_default=False)],
    prompt: Annotated[str, typer.Option("--prompt", "-p", rich_help_panel="Prompts",
                                        help="The prompt both images were generated for.")],
    dim: Dims = None, condition: Condition = None, mask_threshold: MaskThreshold = DEFAULT_THRESHOLD,
    as_json: AsJson = False, as_jsonl: AsJsonl = False, as_csv: AsCsv = False, html: Html = None,
    weights: Weights = None, config: Config = None, revision: Revision = None, offline: Offline = False,
    device: Device = "auto", dtype: Dtype = "auto", batch_size: BatchSize = None,
    server: ServerUrl = None, token: ServerToken = None,
) -> None:
    """Which of two images people would prefer for a prompt: per dimension, both scores, p_a (the softmax of the pair: P(A preferred)) and the winner."""
    from ..scorer import compare_scores

    mode = _output_mode(as_json, as_jsonl, as_csv)
    keys = _keys(dim, condition)
    items = [Item(label=a, path=Path(a), prompt=prompt), Item(label=b, path=Path(b), prompt=prompt)]
    with handle_errors():
        scorer = open_scorer(server, token, weights, config, device, dtype, revision, offline, batch_size)
        ra, rb = list(_results(scorer, items, dim, condition, mask_threshold, batch_size, None))
    bad = [r for r in (ra, rb) if r.error is not None]
    if bad:
        for r in bad:
            if mode in ("json", "jsonl"):
                _emit(json.dumps({"image": r.image, "error": r.error}, ensure_ascii=False) + "\n")
            say(f"mps: error: {r.error}")
        raise typer.Exit(int(Exit.PARTIAL))
    if ra.prompt_truncated:
        say("mps: warning: the prompt is longer than 77 tokens; the model reads only the first 77")
    results = {k: compare_scores(ra.scores[k], rb.scores[k]) for k in keys}
    doc = {"prompt": prompt, "a": a, "b": b,
           "results": {k: {"a": v.a, "b": v.b, "p_a": v.p_a, "winner": v.winner} for k, v in results.items()}}
    try:
        if mode in ("json", "jsonl"):
            _emit(json.dumps(doc, ensure_ascii=False, indent=2 if mode == "json" else None) + "\n")
        elif mode == "csv":
            buf = io.StringIO()
            w = csv.writer(buf, lineterminator="\n")
            w.writerow(["dimension", "a", "b", "score_a", "score_b", "p_a", "winner"])
            for k, v in results.items():
                w.writerow([k, a, b, f"{v.a:.6f}", f"{v.b:.6f}", f"{v.p_a:.6f}", v.winner])
            _emit(buf.getvalue())
        else:
            from rich.console import Console
            from rich.table import Table

            table = Table(caption=f"prompt: {prompt}", caption_justify="left")
            for col, just in (("dimension", "left"), ("A", "right"), ("B", "right"), ("P(A preferred)", "right"),
                              ("winner", "left")):
                table.add_column(col, justify=just)
            for k, v in results.items():
                name = {"a": f"A ({a})", "b": f"B ({b})", "tie": "tie"}[v.winner]
                table.add_row(k, f"{v.a:.3f}", f"{v.b:.3f}", f"{v.p_a:.3f}", name)
            Console(soft_wrap=False).print(table)
    except BrokenPipeError:
        _quiet_broken_pipe()
    write_html(html, [doc], scorer, mask_threshold, keys)
    raise typer.Exit(int(Exit.OK))
