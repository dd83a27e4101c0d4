"""The `diad-jax` console command (pyproject's [project.scripts]) and the checkout shims: one
implementation per program (diad_jax/commands/<name>.py), reached both ways."""
import ast
import dataclasses
import re
import subprocess

import pytest

from diad_jax import cli
from diad_jax.commands import COMMANDS
from diad_jax.configs import EvalConfig, TrainConfig
from tests.scripts import ENTRY_POINT, ROOT

SHIMS = sorted([*ROOT.glob("scripts/*.py"), *ROOT.glob("convert/*.py")])


def test_the_console_command_lists_every_command_and_refuses_unknown_ones():
    assert ENTRY_POINT.is_file(), f"{ENTRY_POINT} missing: `pip install -e .` creates it (make install)"
    out = subprocess.run([str(ENTRY_POINT), "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0
    assert re.findall(r"^  (\S+) ", out.stdout, re.M) == list(COMMANDS)
    bad = subprocess.run([str(ENTRY_POINT), "tarin"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "unknown command 'tarin'" in bad.stderr


def test_every_command_answers_help_in_a_subprocess():
    procs = {name: subprocess.Popen([str(ENTRY_POINT), name, "--help"], stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True) for name in COMMANDS}
    for name, p in procs.items():
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, (name, err[-2000:])
        assert out.startswith(f"usage: diad-jax {name} "), (name, out[:200])


@pytest.mark.parametrize("shim", SHIMS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_each_checkout_script_runs_a_command(shim):
    """scripts/*.py and convert/*.py only import a command's main: no second implementation."""
    imported = re.findall(r"^from diad_jax\.commands\.(\w+) import", shim.read_text(), re.M)
    assert len(imported) == 1 and imported[0] in {m for m, _ in COMMANDS.values()}, shim
    assert len(shim.read_text().splitlines()) < 12, f"{shim} holds more than the shim"


def test_every_command_has_a_checkout_script():
    modules = {re.findall(r"^from diad_jax\.commands\.(\w+) import", s.read_text(), re.M)[0] for s in SHIMS}
    assert modules == {m for m, _ in COMMANDS.values()}


def test_hints_and_messages_name_the_diad_jax_command():
    """Every string the library prints (messages, hints, --help; not docstrings) names `diad-jax <cmd>`,
    which works in a checkout and in a wheel install alike, never a checkout path (scripts/X.py)."""
    checkout_path = re.compile(r"\b(scripts|convert)/\w+\.py\b")
    found = []
    for path in sorted((ROOT / "diad_jax").rglob("*.py")):
        tree = ast.parse(path.read_text())
        docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                      if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                      and node.body and isinstance(node.body[0], ast.Expr)
                      and isinstance(node.body[0].value, ast.Constant)}
        for node in ast.walk(tree):
            if (isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings
                    and checkout_path.search(node.value)):
                found.append(f"{path.relative_to(ROOT)}:{node.lineno}: {node.value.strip()[:80]}")
    assert not found, "\n".join(found)


def _literal_text(node: ast.AST) -> str:
    """The literal text of a string expression ({} for an f-string's values, '' for anything else)."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        return "".join(_literal_text(v) if isinstance(v, ast.Constant) else "{}" for v in node.values)
    if isinstance(node, ast.BinOp):
        return _literal_text(node.left) + _literal_text(node.right)
    return ""


def test_library_errors_and_log_lines_name_fields_never_flags():
    """Outside diad_jax/cli and diad_jax/commands, what the library raises or logs names config
    fields and argument names (the commands name them by their flags); a `--flag` may appear only
    in a hint that names the program it belongs to (`diad-jax convert --resnet ...`)."""
    hint = re.compile(r"diad-jax [a-z-]+[^`)\n;]*")
    flag = re.compile(r"(?<![\w-])--[a-z][a-z-]*")
    logging_calls = {"debug", "info", "warning", "error", "exception"}
    found = []
    for path in sorted((ROOT / "diad_jax").rglob("*.py")):
        if path.parent.name in ("cli", "commands"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call):
                call = node.exc
            elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                  and node.func.attr in logging_calls):
                call = node
            else:
                continue
            for arg in [*call.args, *(k.value for k in call.keywords)]:
                texts = {_literal_text(n) for n in ast.walk(arg)}
                for text in {t for t in texts if not any(t != u and t in u for u in texts)}:  # outermost
                    for bad in flag.findall(hint.sub("", text)):
                        found.append(f"{path.relative_to(ROOT)}:{call.lineno}: {bad} in {text.strip()[:90]!r}")
    assert not found, "\n".join(found)


# a valid EvalConfig in which every field differs from the default
OTHER_EVAL = EvalConfig(method="inversion", schedule="consistent", ddim_steps=1, eta=0.5, guidance_scale=3.0,
                        start_t=500, one_step=True, comparator="ssim", sigma=2.0, pool_window=4, image_score="max",
                        inversion_steps=2, inversion_end_t=500, inversion_latent="sample", variant="reference",
                        batch_size=4, seed=3, dtype="bfloat16", dedupe_guidance=False, attention="xla")


def _eval_argv(prefix: str) -> list[str]:
    return [arg for f in dataclasses.fields(EvalConfig)
            for arg in (f"--{prefix}{f.name.replace('_', '-')}", str(getattr(OTHER_EVAL, f.name)).lower()
                        if isinstance(getattr(OTHER_EVAL, f.name), bool) else str(getattr(OTHER_EVAL, f.name)))]


def test_every_eval_config_field_is_a_flag_of_evaluate_and_of_train():
    """One rule: `--<field>` in the scoring programs, `--eval-<field>` in training, for every field."""
    assert all(getattr(OTHER_EVAL, f.name) != f.default for f in dataclasses.fields(EvalConfig)), \
        "OTHER_EVAL must change every field (a new EvalConfig field: give it a value here)"
    from diad_jax.commands import evaluate, train

    args = evaluate.build_parser().parse_args(["--checkpoint", "random:tiny", *_eval_argv("")])
    assert cli.scoring_checkpoint(args)[1] == OTHER_EVAL
    args = train.build_parser().parse_args(_eval_argv("eval-"))
    assert cli.config_from_args(TrainConfig.tiny(), args).eval == OTHER_EVAL
    # the old names still work
    args = evaluate.build_parser().parse_args(["--checkpoint", "random:tiny", "--bf16", "--no-dedupe"])
    assert (cli.scoring_checkpoint(args)[1].dtype, cli.scoring_checkpoint(args)[1].dedupe_guidance) == ("bfloat16",
                                                                                                       False)
    args = train.build_parser().parse_args(["--metrics-variant", "reference"])
    assert cli.config_from_args(TrainConfig.tiny(), args).eval.variant == "reference"


@pytest.mark.parametrize("argv, shown", [
    (["train", "--eval-sigma", "-1", "--print-config"], "error: --eval-sigma must be > 0"),
    (["train", "--lr", "nan", "--print-config"], "error: --lr must be a finite number"),
    (["evaluate", "--checkpoint", "random:tiny", "--sigma", "-1"], "error: --sigma must be > 0"),
    (["train", "--eval-comparator", "resnet", "--eval-resnet", "checkpoint", "--workdir", "{tmp}"],
     "with --eval-resnet random (maps then compare random features), compare without it (--eval-comparator pixel_l1), or evaluate nothing (--eval-split none)"),
])
def test_a_library_error_names_the_flag_on_the_command_line(argv, shown, tmp_path, capsys):
    """What the library says of a field, the command says of the flag that set it."""
    from diad_jax import commands

    assert commands.main([a.format(tmp=tmp_path) for a in argv]) == 2
    assert shown in capsys.readouterr().err
