"""The ``mps`` command line: a thin layer over :mod:`mps_cli`.

One module per command family, ``*_cmds.py``; every command is registered here, in the order
``mps --help`` lists them.
"""

from __future__ import annotations

import inspect

import typer

from . import (
    dataset_cmds,
    demo_cmds,
    eval_cmds,
    output,
    report_cmds,
    scoring_cmds,
    serve_cmds,
    versus_cmds,
    weights_cmds,
)
from .app import app

_EXAMPLES = {
    "score": ["mps score gen.png --prompt 'a red fox in the snow'",
              "mps score out/ --prompt 'a cozy café' --dim aesthetics,detail --jsonl",
              "mps score --prompts prompts.jsonl --csv > scores.csv",
              "find runs -name '*.png' -print0 | mps score - -0 --prompt-from metadata --jsonl"],
    "compare": ["mps compare a.png b.png --prompt 'three blue cubes on a table'",
                "mps compare a.png b.png --prompt-from metadata --dim all --json"],
    "rank": ["mps rank samples/ --prompt 'portrait of an old fisherman' --top 5",
             "mps rank samples/ --prompt-from metadata --by aesthetics --json"],
    "eval": ["mps eval pairs pairs.jsonl --images-root images/ --json"],
    "download": ["mps download", "mps download hf://RE-N-Y/mpsv1/model.safetensors"],
    "info": ["mps info --json"],
    "convert": ["mps convert MPS_overall_checkpoint.pth mps.safetensors --dtype fp16"],
    "versus": ["mps versus runs/v1 runs/v2 --prompts prompts.jsonl",
               "mps versus runs/v1 runs/v2 runs/v3 --prompt-from sidecar --dim all --json",
               "mps versus v1.jsonl dataset-out/ --details --html versus.html"],
    "dataset": ["mps dataset 'shards/{00000..00127}.tar' --out scores/ --dim all",
                "mps dataset data/*.parquet --out scores/ --shard-index $SLURM_ARRAY_TASK_ID --num-shards 16",
                "mps dataset shards/ --out scores/ --engine ray --workers 4 --gpus-per-worker 1"],
    "report": ["mps rank samples/ --prompt 'a castle' --jsonl > ranked.jsonl && mps report ranked.jsonl -o report.html",
               "mps report scores/ -o dataset.html --max-images 500"],
    "serve": ["mps serve --port 8000",
              "mps score out/*.png --prompt 'a red fox' --server http://127.0.0.1:8000 --jsonl"],
    "demo": ["mps demo", "mps demo /tmp/try-mps && mps score /tmp/try-mps/v1 --prompt-from metadata "
             "--weights /tmp/try-mps/demo-weights.safetensors"],
}


def _epilog(name: str) -> str:
    # One paragraph per example: Typer's Rich help keeps paragraphs, not single newlines.
    return "Examples:\n\n" + "\n\n".join(_EXAMPLES[name])


def _help(command, exits: str) -> str:
    """A command's docstring and, as its last paragraph, what its exit codes mean."""
    # Typer's Rich help keeps every newline: a docstring's paragraph, wrapped in the source, is one line here.
    paragraphs = (" ".join(p.split()) for p in inspect.cleandoc(command.__doc__).split("\n\n"))
    return "\n\n".join(paragraphs) + "\n\n" + exits


# Bare, a command that needs arguments shows its help (not the first of several errors it would meet).
app.command("score", epilog=_epilog("score"), help=_help(scoring_cmds.score, scoring_cmds.EXITS),
            no_args_is_help=True)(scoring_cmds.score)
app.command("compare", epilog=_epilog("compare"), help=_help(scoring_cmds.compare, scoring_cmds.COMPARE_EXITS),
            no_args_is_help=True)(scoring_cmds.compare)
app.command("rank", epilog=_epilog("rank"), help=_help(scoring_cmds.rank, scoring_cmds.EXITS),
            no_args_is_help=True)(scoring_cmds.rank)
app.command("eval", help=eval_cmds.EVAL_HELP, no_args_is_help=True, epilog=_epilog("eval"))(eval_cmds.eval_command)
app.command("download", epilog=_epilog("download"), help=_help(weights_cmds.download, weights_cmds.DOWNLOAD_EXITS))(
    weights_cmds.download)
app.command("info", epilog=_epilog("info"), help=_help(weights_cmds.info, weights_cmds.INFO_EXITS))(weights_cmds.info)
app.command("convert", epilog=_epilog("convert"), help=_help(weights_cmds.convert, weights_cmds.CONVERT_EXITS),
            no_args_is_help=True)(weights_cmds.convert)
app.command("versus", help=versus_cmds.VERSUS_HELP, no_args_is_help=True, epilog=_epilog("versus"))(
    versus_cmds.versus_command)
app.command("dataset", help=dataset_cmds.DATASET_HELP, no_args_is_help=True, epilog=_epilog("dataset"))(
    dataset_cmds.dataset_command)
app.command("report", epilog=_epilog("report"), help=_help(report_cmds.report, report_cmds.EXITS),
            no_args_is_help=True)(report_cmds.report)
app.command("serve", epilog=_epilog("serve"), help=_help(serve_cmds.serve, serve_cmds.EXITS))(serve_cmds.serve)
app.command("demo", epilog=_epilog("demo"), help=_help(demo_cmds.demo, demo_cmds.EXITS))(demo_cmds.demo)


def main() -> None:
    """Console-script entry point: a closed pipe is a quiet exit 0 (here, for every command), anything
    unforeseen one line (exit 5), never a traceback. Usage errors are one ``mps: error:`` line already
    (the app's group in :mod:`.app`, so that Typer's test runner sees the same)."""
    import sys
    import warnings

    from .app import Exit, unexpected

    # Images between PIL's warning and refusal sizes are decoded; the warning would only be noise.
    warnings.filterwarnings("ignore", message=r"Image size \(\d+ pixels\) exceeds limit")
    gone = False
    try:
        code = app(standalone_mode=False)
    except typer.Abort:
        code = int(Exit.INTERRUPTED)
    except typer.Exit as exc:
        code = exc.exit_code
    except (BrokenPipeError, SystemExit) as exc:
        gone = output.reader_gone(exc)
        code = getattr(exc, "code", 0)
    except KeyboardInterrupt:
        output.say("interrupted")
        code = int(Exit.INTERRUPTED)
    except Exception as exc:
        code = unexpected(exc, "running").exit_code
    if gone or not output.flush_results():
        output.quiet_broken_pipe()
        code = int(Exit.OK)
    # Everything alive now lives until exit. Frozen, it is left out of the collections that interpreter
    # shutdown runs, which otherwise walk torch's objects one by one: 0.35 s of every scoring command
    # (2-vCPU AMD EPYC). atexit handlers and finalizers still run.
    import gc

    gc.freeze()
    sys.exit(code if isinstance(code, int) else 0)


__all__ = ["app", "main"]
