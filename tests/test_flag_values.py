"""Every flag value a command refuses is said in one voice, ``mps: error: --FLAG must be RULE (got VALUE)``,
in-process and from the console script alike; help names values (N, FILE, DIR), never Python types; a short
flag means one thing in every command."""

from __future__ import annotations

import pytest
import typer.main
from conftest import IMAGES, WEIGHTS, run_cli, run_mps

from mps_cli.cli import app

GROUP = typer.main.get_command(app)
COMMANDS = dict(GROUP.commands)

#: What each command needs besides the flag under test, so that only the flag can be wrong.
REQUIRED = {
    "score": ["x.png", "--prompt", "p"], "rank": ["x.png", "--prompt", "p"], "compare": ["a.png", "b.png"],
    "eval": ["pairs", "pairs.jsonl"], "versus": ["a", "b"], "dataset": ["shard.tar", "--out", "out"],
    "report": ["r.jsonl", "-o", "r.html"], "serve": [], "convert": ["a.pth", "b.safetensors"],
}
WHOLE = "a whole number"
NUMBER = "a number"

#: Every bounded flag: its bad values, the rule it must state, and the value echoed as given.
BOUNDED: dict[str, list[tuple[str, str, str]]] = {
    "--batch-size": [("0", f"{WHOLE} of at least 1", "0"), ("four", f"{WHOLE} of at least 1", "'four'"),
                     ("1.5", f"{WHOLE} of at least 1", "1.5")],
    "--device": [("tpu", "one of auto, cpu, cuda, cuda:N or mps", "'tpu'")],
    "--dtype": [("fp64", "auto, fp32, fp16 or bf16, or two of them as IMAGE/TEXT (e.g. bf16/fp32)", "'fp64'"),
                ("bf16/", "auto, fp32, fp16 or bf16, or two of them as IMAGE/TEXT (e.g. bf16/fp32)", "'bf16/'")],
    "--decode": [("quick", "one of auto, exact, fast, draft or tensor", "'quick'")],
    "--compile": [("max", "one of off, on or graphs", "'max'")],
    "--dim": [("beauty", "one of overall, aesthetics, detail, alignment, all", "'beauty'")],
    "--mask-threshold": [("abc", "a number in [0, 1)", "'abc'"), ("1", "a number in [0, 1)", "1"),
                         ("-0.1", "a number in [0, 1)", "-0.1"), ("nan", "a number in [0, 1)", "'nan'")],
    "--prompt-from": [("exif", "one of sidecar, metadata", "'exif'")],
    "--top": [("0", f"{WHOLE} of at least 1", "0"), ("many", f"{WHOLE} of at least 1", "'many'")],
    "--by": [("beauty", "one of overall, aesthetics, detail, alignment, custom", "'beauty'")],
    "--pairing": [("random", "one of by-name, all-pairs-per-prompt", "'random'")],
    "--seed": [("x", WHOLE, "'x'")],
    "--bootstrap": [("0", f"{WHOLE} of at least 1", "0"), ("lots", f"{WHOLE} of at least 1", "'lots'")],
    "--shard-index": [("first", WHOLE, "'first'")],
    "--num-shards": [("two", WHOLE, "'two'")],
    "--engine": [("spark", "one of local, ray", "'spark'")],
    "--workers": [("0", f"{WHOLE} of at least 1", "0")],
    "--gpus-per-worker": [("-1", f"{NUMBER} of at least 0", "-1"), ("one", f"{NUMBER} of at least 0", "'one'")],
    "--cpus-per-worker": [("0", f"{NUMBER} of at least 0.01", "0")],
    "--thumb": [("8", f"{WHOLE} from 16 to 2048", "8"), ("4096", f"{WHOLE} from 16 to 2048", "4096")],
    "--thumb-format": [("gif", "one of webp, jpeg", "'gif'")],
    "--max-images": [("0", f"{WHOLE} of at least 1", "0")],
    "--port": [("0", f"{WHOLE} from 1 to 65535", "0"), ("http", f"{WHOLE} from 1 to 65535", "'http'")],
    "--max-batch": [("0", f"{WHOLE} of at least 1", "0")],
    "--max-wait-ms": [("-1", f"{NUMBER} of at least 0", "-1"), ("soon", f"{NUMBER} of at least 0", "'soon'")],
    "--max-queue": [("0", f"{WHOLE} of at least 1", "0")],
    "--max-body-mb": [("0", f"{NUMBER} of at least 0.001", "0")],
    "--max-image-mpx": [("0", f"{NUMBER} of at least 0.000001", "0")],
    "--read-timeout": [("0.05", f"{NUMBER} of at least 0.1", "0.05")],
}
#: convert's --dtype is a storage dtype, not the model's IMAGE/TEXT pair.
BY_COMMAND = {("convert", "--dtype"): [("fp64", "one of fp32, fp16, bf16", "'fp64'")]}


def _long(param) -> str:
    return next(o for o in param.opts if o.startswith("--"))


def _options(command):
    return [p for p in command.params if p.param_type_name == "option" and not p.is_flag]


def _cases():
    for name, command in COMMANDS.items():
        for param in _options(command):
            flag = _long(param)
            for bad, rule, got in BY_COMMAND.get((name, flag), BOUNDED.get(flag, [])):
                yield pytest.param(name, flag, bad, rule, got, id=f"{name} {flag} {bad}")


CASES = list(_cases())


@pytest.mark.parametrize(("command", "flag", "bad", "rule", "got"), CASES)
def test_a_bad_value_is_one_line_naming_the_flag_the_rule_and_the_value(command, flag, bad, rule, got, tmp_path):
    from mps_cli.cli.app import LOADS

    loads = LOADS["count"]
    res = run_cli(command, flag, bad, *REQUIRED[command], cwd=tmp_path)
    assert (res.returncode, res.stdout) == (2, "")
    assert res.stderr == f"mps: error: {flag} must be {rule} (got {got})\n"
    assert LOADS["count"] == loads
    assert list(tmp_path.iterdir()) == []  # nothing written: the run never started


def test_the_table_covers_every_number_and_choice_option_of_every_command():
    """A new bounded option without a row here would be untested: every option Typer reads as a number or a
    choice, or that a check of ours refuses, has a case in every command that has it."""
    covered = {(c.values[0], c.values[1]) for c in CASES}
    numeric = set()
    for name, command in COMMANDS.items():
        for param in _options(command):
            desc = param.type_descriptor
            if desc.annotation in (int, float) or desc.is_choice or param.callback is not None or \
                    desc.parameter_info.parser is not None:
                numeric.add((name, _long(param)))
    # Checked in their own words, after the flag (test_other_usage_errors_are_one_line_too).
    assert {f for _, f in numeric - covered} == {"--model", "--reward", "--html", "--out"}
    assert {("serve", "--port"), ("rank", "--top"), ("report", "--thumb"), ("eval", "--mask-threshold"),
            ("dataset", "--workers"), ("versus", "--pairing"), ("compare", "--batch-size")} <= covered
    assert len({f for _, f in covered}) == len(BOUNDED)  # no row in the table that no command has


def test_a_bad_argument_value_names_the_argument():
    res = run_cli("eval", "imagenet", "pairs.jsonl")
    assert (res.returncode, res.stdout) == (2, "")
    assert res.stderr == "mps: error: BENCHMARK must be one of imagereward, hpdv2, pairs (got 'imagenet')\n"
    res = run_cli("convert", "a.pth", "b.bin")
    assert res.stderr == "mps: error: DST must be a file name ending in .safetensors (got 'b.bin')\n"


@pytest.mark.parametrize(("args", "line"), [
    (["score", "x.png", "-p", "p", "--model", "dall-e"],
     "mps: error: --model: unknown model 'dall-e': expected one of mps, hpsv2.1, pickscore, clipscore "
     "(see 'mps score --help')"),
    (["score", "x.png", "-p", "p", "--reward", "overall+"],
     "mps: error: --reward: cannot read the reward 'overall+': it ends where a number or a name should come "
     "(position 8)"),
    (["score", str(IMAGES / "gray.png"), "-p", "p", "--reward", "overal", "-w", str(WEIGHTS)],
     "mps: error: --reward: unknown reward term 'overal' in 'overal': expected a dimension (overall, aesthetics, "
     "detail, alignment), custom, mps.<dimension> or a model (hpsv2.1, pickscore, clipscore)"),
    (["score", "x.png", "-p", "p", "--html", "/nonexistent-dir/r.html"],
     "mps: error: --html: /nonexistent-dir does not exist (see 'mps score --help')"),
    (["score", "x.png", "--bogus"], "mps: error: No such option: --bogus (see 'mps score --help')"),
    (["report", "r.jsonl"], "mps: error: Missing option '--out' / '--output' / '-o'. (see 'mps report --help')"),
])
def test_other_usage_errors_are_one_line_too(args, line):
    res = run_cli(*args)
    assert (res.returncode, res.stdout, res.stderr) == (2, "", line + "\n")


def test_the_console_script_says_what_the_test_runner_says():
    args = ("rank", "x.png", "--prompt", "p", "--top", "0")
    here, there = run_cli(*args), run_mps(*args)
    assert (there.returncode, there.stdout, there.stderr) == (here.returncode, here.stdout, here.stderr) \
        == (2, "", "mps: error: --top must be a whole number of at least 1 (got 0)\n")


# --------------------------------------------------------------------------- help


@pytest.mark.parametrize("command", list(COMMANDS))
def test_help_names_values_never_python_types(command):
    res = run_cli(command, "--help", env={"COLUMNS": "200"})
    assert res.returncode == 0, res.stderr
    for leak in ("<list[", "<str>", "<int>", "<float>", "<path>", "<bool>", "[str]", "int range", "float range",
                 "x>=", "<=x", "1e-06"):
        assert leak not in res.stdout, (command, leak)
    assert f"Usage: mps {command} " in res.stdout


def test_help_shows_metavars_and_bounds_in_words():
    arguments = {(n, p.name): p.metavar for n, c in COMMANDS.items() for p in c.params
                 if p.param_type_name == "argument"}
    assert len(arguments) >= 10 and all(m and m.isupper() for m in arguments.values()), arguments
    serve = " ".join(run_cli("serve", "--help", env={"COLUMNS": "200"}).stdout.split())
    assert "--port PORT [from 1 to 65535]" in serve and "--max-image-mpx MPX [at least 0.000001]" in serve
    rank = " ".join(run_cli("rank", "--help", env={"COLUMNS": "200"}).stdout.split())
    assert "Usage: mps rank [OPTIONS] [IMAGE]..." in rank and "--top -k K [at least 1]" in rank
    assert "--prompts FILE" in rank and "--batch-size -b N [at least 1]" in rank
    assert "--mask-threshold X Keep prompt tokens whose condition similarity ratio exceeds this: a number in [0, 1)." \
        in rank
    evaluation = " ".join(run_cli("eval", "--help", env={"COLUMNS": "200"}).stdout.split())
    assert "--images-root DIR" in evaluation and "* FILE The benchmark file" in evaluation


def test_a_short_flag_means_one_option_in_every_command():
    meanings: dict[str, list[set[str]]] = {}
    for command in COMMANDS.values():
        for param in command.params:
            shorts = [o for o in (*param.opts, *param.secondary_opts) if not o.startswith("--")]
            longs = {o for o in (*param.opts, *param.secondary_opts) if o.startswith("--")}
            for short in shorts if param.param_type_name == "option" else ():
                meanings.setdefault(short, []).append(longs)
    assert {"-r", "-o", "-p", "-b", "-d", "-w", "-m"} <= set(meanings)
    clashes = {s: sets for s, sets in meanings.items() if not set.intersection(*sets)}
    assert not clashes
    assert set.union(*meanings["-r"]) == {"--recursive"}
    assert "-r" not in [o for p in COMMANDS["eval"].params for o in p.opts]
