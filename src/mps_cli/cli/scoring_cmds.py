"""``mps score``, ``mps rank`` and ``mps compare``: inputs are resolved and checked first, the model
is loaded only when at least one input is usable, and results go out through :mod:`.output`."""

from __future__ import annotations

import io
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import typer

from ..composite import COMPOSITE_KEY, Composite
from ..constants import CUSTOM_KEY, DEFAULT_MASK_THRESHOLD, DIMENSIONS
from ..engine.options import ModelOptions
from ..errors import CompositeError, ImageError, PromptError
from ..inputs.items import Item, Problem, PromptSource, attach_prompts, expand, files, from_prompt_file
from .app import INPUT_HINTS, Exit, exit_help, fail, handle_errors
from .options import (
    MODEL,
    REMOTE,
    RUN,
    AsCsv,
    AsJson,
    AsJsonl,
    Condition,
    Dims,
    MaskThreshold,
    Remote,
    Reward,
    RunOptions,
    open_scorer,
    takes,
)
from .output import Progress, warning
from .render import Report, ResultWriter, Row, comparison_record, finite_or_error, render_comparison
from .report_cmds import Html, write_html
from .values import BadValue

Prompt = Annotated[str | None, typer.Option(
    "--prompt", "-p", metavar="TEXT", rich_help_panel="Prompts", help="The prompt, for every image.")]
PromptsFile = Annotated[Path | None, typer.Option(
    "--prompts", metavar="FILE", rich_help_panel="Prompts",
    help="The images and their prompts: JSONL ({\"image\": ..., \"prompt\": ...} per line), a JSON array "
    "(what --json prints), CSV (image, prompt columns), or a Hugging Face imagefolder metadata.jsonl "
    "(file_name, text). Relative image paths resolve against the file's folder.")]
PromptFromOpt = Annotated[PromptSource | None, typer.Option(
    "--prompt-from", rich_help_panel="Prompts",
    help="sidecar: the caption file beside each image (same stem, .txt or .caption); metadata: the "
    "prompt generators embed (AUTOMATIC1111, ComfyUI, InvokeAI, Fooocus, NovelAI).")]
Null = Annotated[bool, typer.Option(
    "--null", "-0", rich_help_panel="Inputs",
    help="Paths read from stdin (-) are NUL-separated, as find -print0 writes them.")]
Recursive = Annotated[bool, typer.Option("--recursive", "-r", rich_help_panel="Inputs",
                                         help="Descend into sub-folders of folder arguments.")]

EXITS = exit_help({Exit.OK: "all scored", Exit.PARTIAL: "some inputs failed (the rest are still printed)"})
# A comparison is one result: with an image unreadable there is no "rest" to print.
COMPARE_EXITS = exit_help({Exit.OK: "compared", Exit.PARTIAL: "A or B could not be scored, or their prompts differ "
                                                              "(the result carries the error)"})


@dataclass(frozen=True)
class Scoring:
    """What to score: dimensions, a custom condition, the mask threshold, and the result keys they give; with
    ``--reward``, the composite (bound to those keys) and the models it needs (``models``)."""

    dims: list[str] | None
    condition: str | None
    mask_threshold: float
    keys: tuple[str, ...]
    composite: Composite | None = None
    models: str | None = None

    def model_for(self, model: ModelOptions) -> ModelOptions:
        """``model`` with the models the composite needs (``--reward`` naming a judge loads it)."""
        from dataclasses import replace

        return model if self.models == model.model else replace(model, model=self.models)


def scoring(dims: list[str] | None, condition: str | None, mask_threshold: float,
            models: str | None = None, reward: str | None = None) -> Scoring:
    """What to score; with ``models`` (``--model``) the keys are the panel's (``mps.overall``, ``hpsv2.1``, ...);
    ``reward`` adds the dimensions (and judges) it names."""
    from ..composite import parse_composite
    from ..engine.panel import parse_models, result_keys
    from ..engine.scorer import resolve_conditions
    from .app import describe

    composite = None
    try:
        if reward is not None:
            composite = parse_composite(reward)
            wanted, dims = composite.request(models.split(",") if models else None, dims, condition)
            models = ",".join(wanted) if wanted else models
        if models:
            keys = result_keys(parse_models(models), dims, condition)
        else:
            keys = tuple(k for k, _ in resolve_conditions(dims, condition))
        composite = composite.bind(keys) if composite is not None else None
    except CompositeError as exc:
        raise fail(describe(exc), Exit.USAGE) from None
    except ValueError as exc:
        raise fail(describe(exc), Exit.USAGE) from None
    return Scoring(dims, condition, mask_threshold, keys, composite, models)


def output_mode(as_json: bool, as_jsonl: bool, as_csv: bool) -> str:
    chosen = [m for m, on in (("json", as_json), ("jsonl", as_jsonl), ("csv", as_csv)) if on]
    if len(chosen) > 1:
        raise fail(f"choose one output format, not {' and '.join('--' + c for c in chosen)}", Exit.USAGE)
    return chosen[0] if chosen else "table"


def warn_empty_prompt(prompt: str | None) -> None:
    """An empty --prompt is a valid text, but most often an unset shell variable (``--prompt "$P"``): say so."""
    if prompt is not None and not prompt.strip():
        warning("--prompt is empty: every image is scored against no text (an unset shell variable?)")


def _one_prompt_source(prompt, prompts_file, prompt_from) -> None:
    sources = [n for n, on in (("--prompt", prompt is not None), ("--prompts", prompts_file is not None),
                               ("--prompt-from", prompt_from is not None)) if on]
    if not sources:
        raise fail("no prompt: give --prompt TEXT, --prompts FILE or --prompt-from sidecar|metadata", Exit.USAGE)
    if len(sources) > 1:
        raise fail(f"choose one prompt source, not {' and '.join(sources)}", Exit.USAGE)
    warn_empty_prompt(prompt)


#: How image files begin (PNG, JPEG, GIF, TIFF; WebP is RIFF....WEBP): stdin that does is an image piped in
#: (`cat a.png | mps score -`) where paths were expected, one mistake, not thousands of lines of bad paths.
_IMAGE_SIGNATURES = (b"\x89PNG\r\n", b"\xff\xd8\xff", b"GIF87a", b"GIF89a", b"II*\0", b"MM\0*")


def _stdin(null: bool) -> io.StringIO:
    """The paths piped in, as text; an image's bytes, or line breaks without a NUL under -0, are usage errors."""
    # Bytes, decoded as the OS decodes file names, so a name that is not UTF-8 still names its file.
    raw = sys.stdin.buffer.read() if hasattr(sys.stdin, "buffer") else sys.stdin.read().encode()
    if raw.startswith(_IMAGE_SIGNATURES) or (raw[:4] == b"RIFF" and raw[8:12] == b"WEBP"):
        raise fail("-: stdin holds an image, not paths: name the image as an argument instead, or pipe in "
                   "paths, one per line", Exit.USAGE)
    if null and b"\0" not in raw and b"\n" in raw:
        raise fail("-0: stdin holds no NUL byte but line breaks: for paths one per line, drop -0", Exit.USAGE)
    return io.StringIO(os.fsdecode(raw))


def collect(images: list[str], prompt: str | None, prompts_file: Path | None,
            prompt_from: PromptSource | None, recursive: bool, null: bool) -> list[Item]:
    """Every input resolved and checked, with its prompt or its error; usage errors exit 2."""
    _one_prompt_source(prompt, prompts_file, prompt_from)
    if prompts_file is not None:
        if images:
            raise fail("--prompts FILE lists the images itself; drop the image arguments", Exit.USAGE)
        try:
            return from_prompt_file(prompts_file)
        except PromptError as exc:
            raise fail(str(exc), Exit.USAGE) from None
    if not images:
        raise fail("no images given (paths, folders, or - to read paths from stdin)", Exit.USAGE)
    items = expand(images, recursive, stdin=_stdin(null) if "-" in images else None, null=null)
    attach_prompts(items, prompt, prompt_from)
    return items


def _rows(scorer, items: list[Item], how: Scoring, batch_size: int | None, progress, report: Report
          ) -> Iterator[Row]:
    """Rows in input order; items that failed before scoring come back as errors."""
    good = [it for it in items if it.ok]
    stream = iter(())
    if good:
        stream = scorer.iter_score([it.path for it in good], [it.prompt for it in good], dims=how.dims,
                                   condition=how.condition, mask_threshold=how.mask_threshold,
                                   batch_size=batch_size, progress=progress)
    for it in items:
        if not it.ok:
            if progress:
                progress(1)
            row = Row(image=it.label, prompt=it.prompt, error=it.error)
            report.result(row, it.problem)
        else:
            r = next(stream)
            row = finite_or_error(Row(image=it.label, prompt=r.prompt, scores=dict(r.scores), error=r.error))
            if how.composite is not None and row.error is None:
                row.composite, row.terms = float(how.composite.value(row.scores)), how.composite.terms(row.scores)
            report.result(row, truncated=r.prompt_truncated)
        yield row


def _ranked(rows: list[Row], by: str, top: int | None, grouped: bool) -> list[Row]:
    """Best first within each prompt group (groups in order of first appearance); failures last."""
    groups: dict[str | None, list[Row]] = {}
    for r in rows:
        if r.error is None:
            groups.setdefault(r.prompt if grouped else None, []).append(r)
    out = []
    for n, members in enumerate(groups.values(), 1):
        members.sort(key=lambda r: -(r.composite if by == COMPOSITE_KEY else r.scores[by]))
        for i, r in enumerate(members[:top] if top else members, 1):
            r.rank, r.group = i, (n if grouped else None)
            out.append(r)
    return out + [r for r in rows if r.error is not None]


def _model_by(by: str, models: str) -> tuple[str | None, str | None]:
    """``--by`` with ``--model``: (the MPS dimension to make sure is scored, or None; the result key to rank by)."""
    from ..constants import JUDGES, MPS_MODEL
    from ..engine.panel import parse_models

    if by in JUDGES:
        names = [m.name for m in parse_models(models)]
        if by not in names:
            raise BadValue(f"one of the --model models ({', '.join(names)})", by, flag="--by")
        return None, by
    dim = by.removeprefix(MPS_MODEL + ".")
    return dim, None


def score_items(items: list[Item], how: Scoring, model: ModelOptions, writer: ResultWriter, *, run: RunOptions,
        remote: Remote, rank_by: str | None = None, top: int | None = None, html: Path | None = None) -> int:
    """Score items and write them (and the ``html`` report); returns how many failed.

    The model loads (or the server is reached) only if an input is usable.
    """
    report = Report(INPUT_HINTS)
    written: list[Row] = []
    scorer = open_scorer(how.model_for(model), remote, run) if any(it.ok for it in items) else None
    with handle_errors("scoring"):
        batch = run.batch_for(scorer)
        with Progress(len(items), batch or len(items)) as progress:
            rows = _rows(scorer, items, how, batch, progress.callback, report)
            if rank_by is not None:
                rows = _ranked(list(rows), rank_by, top, writer.grouped)
            for row in rows:
                writer.add(row)
                written.append(row)
        writer.close()
    report.close(always=True)
    write_html(html, [r.record() for r in written], scorer, how.mask_threshold, how.keys)
    return report.failed


@takes(MODEL, RUN, REMOTE)
def score(
    images: Annotated[list[str] | None, typer.Argument(
        metavar="IMAGE", help="Image files, folders, or - to read paths from stdin.", show_default=False)] = None,
    prompt: Prompt = None, prompts: PromptsFile = None, prompt_from: PromptFromOpt = None,
    dim: Dims = None, condition: Condition = None, mask_threshold: MaskThreshold = DEFAULT_MASK_THRESHOLD,
    reward: Reward = None, recursive: Recursive = False, null: Null = False,
    as_json: AsJson = False, as_jsonl: AsJsonl = False, as_csv: AsCsv = False, html: Html = None,
    *, model: ModelOptions, run: RunOptions, remote: Remote,
) -> None:
    """Score images for their prompts: one result per image."""
    mode = output_mode(as_json, as_jsonl, as_csv)
    how = scoring(dim, condition, mask_threshold, model.model, reward)
    items = collect(images or [], prompt, prompts, prompt_from, recursive, null)
    failed = score_items(items, how, model, ResultWriter(mode, how.keys, composite=reward is not None), run=run,
                         remote=remote, html=html)
    raise typer.Exit(int(Exit.PARTIAL if failed else Exit.OK))


@takes(MODEL, RUN, REMOTE)
def rank(
    images: Annotated[list[str] | None, typer.Argument(
        metavar="IMAGE", help="A folder, image files, or - to read paths from stdin.", show_default=False)] = None,
    prompt: Prompt = None, prompts: PromptsFile = None, prompt_from: PromptFromOpt = None,
    by: Annotated[str | None, typer.Option(
        "--by", metavar="KEY", rich_help_panel="Scoring",
        help="Dimension to order by (default: the first requested; with --reward, composite).")] = None,
    top: Annotated[int | None, typer.Option(
        "--top", "-k", min=1, metavar="K", rich_help_panel="Output",
        help="Show only the best K (of each prompt group).")] = None,
    dim: Dims = None, condition: Condition = None, mask_threshold: MaskThreshold = DEFAULT_MASK_THRESHOLD,
    reward: Reward = None, recursive: Recursive = False, null: Null = False,
    as_json: AsJson = False, as_jsonl: AsJsonl = False, as_csv: AsCsv = False, html: Html = None,
    *, model: ModelOptions, run: RunOptions, remote: Remote,
) -> None:
    """Rank images best first by one dimension; failed inputs are listed after the ranking.

    Scores compare only within a prompt: with --prompts or --prompt-from, images are ranked within
    each prompt group, and every row says its group (numbered in order of first appearance).
    With --model, --by takes a result key (mps.detail, hpsv2.1, ...) or an MPS dimension.
    """
    mode = output_mode(as_json, as_jsonl, as_csv)
    by_key = None
    if by == COMPOSITE_KEY or (by is None and reward is not None):
        if reward is None:
            raise fail("--by composite needs --reward", Exit.USAGE)
        by, by_key = None, COMPOSITE_KEY
    if by is not None and model.model:
        by, by_key = _model_by(by, model.model)
    if by is not None:
        if by not in (*DIMENSIONS, CUSTOM_KEY):
            raise BadValue(f"one of {', '.join(DIMENSIONS)}, custom", by, flag="--by")
        if by == CUSTOM_KEY and condition is None:
            raise fail("--by custom needs --condition", Exit.USAGE)
        if by != CUSTOM_KEY and by not in (dim or []) and "all" not in (dim or []):
            dim = [*(dim or ([] if condition else ["overall"])), by]
    how = scoring(dim, condition, mask_threshold, model.model, reward)
    items = collect(images or [], prompt, prompts, prompt_from, recursive, null)
    grouped = prompt is None
    rank_by = by_key or (f"mps.{by}" if how.models and by else by) or how.keys[0]
    writer = ResultWriter(mode, how.keys, rank=True, grouped=grouped, composite=reward is not None)
    failed = score_items(items, how, model, writer, run=run, remote=remote, rank_by=rank_by, top=top, html=html)
    raise typer.Exit(int(Exit.PARTIAL if failed else Exit.OK))


@takes(MODEL, RUN, REMOTE)
def compare(
    a: Annotated[str, typer.Argument(metavar="A", help="Image A.", show_default=False)],
    b: Annotated[str, typer.Argument(metavar="B", help="Image B.", show_default=False)],
    prompt: Annotated[str | None, typer.Option(
        "--prompt", "-p", metavar="TEXT", rich_help_panel="Prompts",
        help="The prompt both images were generated for.")] = None,
    prompt_from: Annotated[PromptSource | None, typer.Option(
        "--prompt-from", rich_help_panel="Prompts",
        help="Read the prompt beside (sidecar) or inside (metadata) the images; both must hold the same.")] = None,
    dim: Dims = None, condition: Condition = None, mask_threshold: MaskThreshold = DEFAULT_MASK_THRESHOLD,
    as_json: AsJson = False, as_jsonl: AsJsonl = False, as_csv: AsCsv = False, html: Html = None,
    *, model: ModelOptions, run: RunOptions, remote: Remote,
) -> None:
    """Which of two images people would prefer for a prompt: per dimension, both scores, p_a (the softmax of the pair: P(A preferred)) and the winner."""  # noqa: E501 (Typer shows the docstring as one help line)
    mode = output_mode(as_json, as_jsonl, as_csv)
    how = scoring(dim, condition, mask_threshold, model.model)
    if prompt is None and prompt_from is None:
        raise fail("no prompt: give --prompt TEXT or --prompt-from sidecar|metadata", Exit.USAGE)
    if prompt is not None and prompt_from is not None:
        raise fail("choose one prompt source, not --prompt and --prompt-from", Exit.USAGE)
    warn_empty_prompt(prompt)
    items = files([a, b])
    attach_prompts(items, prompt, prompt_from)
    # compare takes no --prompts: a prompts file given as A or B is only named.
    report = Report({p: h for p, h in INPUT_HINTS.items() if p is not Problem.PROMPTS_FILE})
    for it in items:
        if not it.ok:
            report.result(Row(image=it.label, prompt=None, error=it.error), it.problem)
    error = "; ".join(it.error for it in items if not it.ok) or None
    if error is None and items[0].prompt != items[1].prompt:
        error = (f"{a} and {b} hold different prompts ({items[0].prompt!r} and {items[1].prompt!r}); "
                 "scores compare only for the same prompt")
        report.result(Row(image=a, prompt=None, error=error))
    the_prompt = prompt if prompt is not None else (items[0].prompt if items[0].ok else None)
    results = scorer = None
    if error is None:
        scorer = open_scorer(model, remote, run)
        results, error = _compare_pair(scorer, items, the_prompt, how, report)
    render_comparison(mode, the_prompt, a, b, results, error)
    report.close()
    if results is not None:
        write_html(html, [comparison_record(the_prompt, a, b, results)], scorer, how.mask_threshold, how.keys)
    raise typer.Exit(int(Exit.PARTIAL if error else Exit.OK))


def _compare_pair(scorer, items: list[Item], prompt: str, how: Scoring, report: Report
                  ) -> tuple[dict | None, str | None]:
    """The comparison's results, or the error that stopped it (said once through ``report``)."""
    a, b = items[0].label, items[1].label
    with handle_errors("scoring"):
        try:
            cmp = scorer.compare(items[0].path, items[1].path, prompt, dims=how.dims, condition=how.condition,
                                 mask_threshold=how.mask_threshold)
        except ImageError as exc:
            report.result(Row(image=a, prompt=None, error=str(exc)))
            return None, str(exc)
    rows = [finite_or_error(Row(a, prompt, {k: v.a for k, v in cmp.results.items()})),
            finite_or_error(Row(b, prompt, {k: v.b for k, v in cmp.results.items()}))]
    bad = [r.error for r in rows if r.error]
    if bad:
        report.result(Row(image=a, prompt=None, error="; ".join(bad)))
        return None, "; ".join(bad)
    if scorer.prompt_truncated(prompt):
        report.result(rows[0], truncated=True)
    return cmp.results, None
