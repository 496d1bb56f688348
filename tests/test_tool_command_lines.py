"""Every command-line tool follows musu.cli's convention, so that a new tool cannot drift.

Each of ``train_net.py``, ``tools/*.py``, ``tools/analysis/*.py`` and ``tools/benchmarks/*.py``
that parses a command line exposes ``build_parser()``; its parser (each subcommand's, for
``visualize.py``) takes ``--config-file``, the config overrides as trailing ``KEY VALUE`` pairs and
after ``--opts``, and ``--register-coco NAME JSON IMAGES`` where the tool reads data. No tool
imports another tool.
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import sys
from pathlib import Path

import pytest

from musu.cli import parse_tool_args

REPO_ROOT = Path(__file__).resolve().parents[1]

# Tools (or "file subcommand") that read no dataset: no --register-coco.
READS_NO_DATA = {
    "tools/publish_model.py",  # a checkpoint and its run folder
    "tools/analysis/visualize.py anchors",  # the regression biases of a checkpoint
    "tools/benchmarks/assigner.py",  # generated boxes
    "tools/benchmarks/flops.py",  # blank images
}
# Subcommands that build no model and read no config: their inputs are training outputs.
NO_CONFIG = {
    "tools/analysis/visualize.py curves",  # metrics.json of run folders
    "tools/analysis/visualize.py assignment-stats",  # metrics.json of run folders
    "tools/analysis/visualize.py size-bands",  # metrics.json of run folders
    "tools/analysis/visualize.py schedule",  # a CSV of finished runs
}
OVERRIDES = ["SOLVER.BASE_LR", "0.5", "MODEL.MUSU.NUM_CLASSES", "3"]


def tool_files() -> list[Path]:
    """Every script that parses a command line."""
    candidates = [REPO_ROOT / "train_net.py"]
    for folder in ("tools", "tools/analysis", "tools/benchmarks"):
        candidates += sorted((REPO_ROOT / folder).glob("*.py"))
    return [path for path in candidates if "argparse" in path.read_text()]


def load_tool(path: Path):
    """The script imported as a module (not run), once per session."""
    name = "tool_" + str(path.relative_to(REPO_ROOT)).replace("/", "_").removesuffix(".py")
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up there
        spec.loader.exec_module(module)
    return sys.modules[name]


def commands() -> list[tuple[str, list[str], argparse.ArgumentParser, argparse.ArgumentParser]]:
    """(name, leading argv, top-level parser, the parser of that command) for every tool and
    every subcommand of a tool."""
    found = []
    for path in tool_files():
        relative = str(path.relative_to(REPO_ROOT))
        module = load_tool(path)
        if not hasattr(module, "build_parser"):  # test_every_tool_has_build_parser fails
            continue
        parser = module.build_parser()
        subparsers = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not subparsers:
            found.append((relative, [], parser, parser))
        for action in subparsers:
            for name, subparser in action.choices.items():
                found.append((f"{relative} {name}", [name], parser, subparser))
    return found


def _value(action: argparse.Action) -> list[str]:
    if action.nargs == 0:
        return []
    count = action.nargs if isinstance(action.nargs, int) else 1
    return [str(action.choices[0]) if action.choices else "1"] * count


def required_argv(parser: argparse.ArgumentParser) -> list[str]:
    """Placeholder values for the options a parse needs besides the convention's."""
    argv = []
    for action in parser._actions:
        if action.dest in ("opts", "config_file", "help") or isinstance(
            action, argparse._SubParsersAction
        ):
            continue
        if action.option_strings and action.required:
            argv += [action.option_strings[0], *_value(action)]
    for group in parser._mutually_exclusive_groups:
        if group.required:
            action = group._group_actions[0]
            argv += [action.option_strings[0], *_value(action)]
    return argv


COMMANDS = commands()
IDS = [name for name, *_ in COMMANDS]


def test_every_tool_has_build_parser() -> None:
    missing = [
        str(path.relative_to(REPO_ROOT))
        for path in tool_files()
        if not hasattr(load_tool(path), "build_parser")
    ]
    assert missing == []


def test_every_user_tool_and_study_script_is_covered() -> None:
    names = {name.split()[0] for name in IDS}
    expected = {"train_net.py", "tools/demo.py", "tools/browse_data.py", "tools/analyze_errors.py"}
    expected |= {"tools/analyze_model.py", "tools/compare.py", "tools/publish_model.py"}
    expected |= {"tools/export_model.py", "tools/analysis/visualize.py"}
    expected |= {"tools/analysis/assignment_stats.py", "tools/analysis/slot_consistency.py"}
    assert expected <= names


@pytest.mark.parametrize("name, lead, parser, command", COMMANDS, ids=IDS)
def test_config_file_and_both_spellings_of_the_overrides(name, lead, parser, command) -> None:
    if name in NO_CONFIG:
        assert "--config-file" not in command.format_help()
        return
    help_text = command.format_help()
    assert "--config-file" in help_text and "--opts" in help_text and "KEY VALUE" in help_text
    base = lead + required_argv(command) + ["--config-file", "c.yaml"]
    for spelling in (OVERRIDES, ["--opts", *OVERRIDES]):
        args = parse_tool_args(parser, base + spelling)
        assert args.opts == OVERRIDES, name
        assert args.config_file in ("c.yaml", ["c.yaml"]), name
    with pytest.raises(SystemExit):  # an odd number of override words is a usage error
        parse_tool_args(parser, base + OVERRIDES[:3])


@pytest.mark.parametrize("name, lead, parser, command", COMMANDS, ids=IDS)
def test_register_coco_where_the_tool_reads_data(name, lead, parser, command) -> None:
    reads_data = name not in READS_NO_DATA | NO_CONFIG
    assert ("--register-coco" in command.format_help()) == reads_data, name
    if reads_data:
        argv = lead + required_argv(command) + ["--config-file", "c.yaml"]
        argv += [
            "--register-coco",
            "a",
            "a.json",
            "a_images",
            "--register-coco",
            "b",
            "b.json",
            "b",
        ]
        args = parse_tool_args(parser, argv + OVERRIDES)
        assert args.register_coco == [["a", "a.json", "a_images"], ["b", "b.json", "b"]]
        assert args.opts == OVERRIDES


def test_train_net_keeps_detectron2s_options() -> None:
    parser = load_tool(REPO_ROOT / "train_net.py").build_parser()
    argv = ["--config-file", "c.yaml", "--eval-only", "--resume", "--num-gpus", "2"]
    argv += [
        "--num-machines",
        "2",
        "--machine-rank",
        "1",
        "--dist-url",
        "tcp://h:1",
        "--check-data",
    ]
    args = parse_tool_args(parser, argv + ["--opts", *OVERRIDES])
    assert args.eval_only and args.resume and args.check_data
    assert (args.num_gpus, args.num_machines, args.machine_rank) == (2, 2, 1)
    assert args.dist_url == "tcp://h:1" and args.opts == OVERRIDES


def test_compare_takes_several_configs_then_the_overrides() -> None:
    parser = load_tool(REPO_ROOT / "tools" / "compare.py").build_parser()
    for argv in (
        ["--config-file", "a.yaml", "b.yaml", *OVERRIDES],
        ["--config-file", "a.yaml", "b.yaml", "--reuse", *OVERRIDES],
        ["--config-file", "a.yaml", "--config-file", "b.yaml", "--opts", *OVERRIDES],
    ):
        args = parse_tool_args(parser, argv)
        assert args.config_file == ["a.yaml", "b.yaml"] and args.opts == OVERRIDES, argv
    with pytest.raises(SystemExit):  # no config file before the overrides
        parse_tool_args(parser, ["--config-file", *OVERRIDES])


def test_no_tool_imports_another_tool() -> None:
    tools = {path.stem: path for path in tool_files()}
    offenders = []
    for stem, path in tools.items():
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name.split(".")[0] for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module.split(".")[0]]
            elif isinstance(node, ast.ImportFrom):  # relative: a sibling script or package
                names = [node.module or "."]
            offenders += [f"{path.relative_to(REPO_ROOT)} imports {n}" for n in names if n in tools]
    assert offenders == []
