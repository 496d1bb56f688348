"""musu.cli: the argument types and the merging of the two spellings of the overrides."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

from musu.cli import (
    non_negative_int,
    output_folder,
    parse_tool_args,
    positive_int,
    probability,
    tool_argument_parser,
)


def test_types_accept_their_range() -> None:
    assert probability("0") == 0.0 and probability("1") == 1.0 and probability("0.25") == 0.25
    assert positive_int("1") == 1 and non_negative_int("0") == 0


@pytest.mark.parametrize(
    "convert, text, message",
    [
        (probability, "1.01", "outside [0, 1]"),
        (probability, "-0.1", "outside [0, 1]"),
        (probability, "nan", "outside [0, 1]"),
        (probability, "high", "not a number"),
        (positive_int, "0", "less than 1"),
        (positive_int, "2.5", "not a whole number"),
        (non_negative_int, "-1", "less than 0"),
    ],
)
def test_types_name_the_problem(convert, text: str, message: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match=re.escape(message)):
        convert(text)


def test_output_folder_is_a_folder_or_new(tmp_path: Path) -> None:
    assert output_folder(str(tmp_path)) == str(tmp_path)
    assert output_folder(str(tmp_path / "new")) == str(tmp_path / "new")
    (tmp_path / "file").write_text("x")
    with pytest.raises(argparse.ArgumentTypeError, match="not a folder"):
        output_folder(str(tmp_path / "file"))


def test_a_bad_value_is_a_usage_error_naming_the_option(capsys) -> None:
    parser = tool_argument_parser("t")
    parser.add_argument("--score-threshold", type=probability, default=0.5)
    with pytest.raises(SystemExit):
        parse_tool_args(parser, ["--config-file", "c.yaml", "--score-threshold", "2"])
    assert "--score-threshold" in capsys.readouterr().err


def test_overrides_from_both_spellings_in_order() -> None:
    parser = tool_argument_parser("t")
    args = parse_tool_args(parser, ["--config-file", "c.yaml", "A.B", "1", "--opts", "C.D", "2"])
    assert args.opts == ["A.B", "1", "C.D", "2"] and not hasattr(args, "_opts_alias")
    assert parse_tool_args(parser, ["--config-file", "c.yaml"]).opts == []
    with pytest.raises(SystemExit):
        parse_tool_args(parser, ["--config-file", "c.yaml", "A.B"])
