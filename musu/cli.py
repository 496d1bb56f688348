"""The one command-line convention of ``train_net.py`` and every tool under ``tools/``.

Every tool takes:

* ``--config-file FILE``: a musu or project YAML config (or a ``musu://`` / model-zoo name);
* ``--register-coco NAME JSON_FILE IMAGE_ROOT`` (repeatable), where the tool reads data;
* config overrides as Detectron2's trailing ``KEY VALUE`` pairs (``opts``), after all options.
  ``--opts KEY VALUE ...`` is accepted as an alias, as Detectron2's own ``demo.py`` spells it.

``tool_argument_parser`` builds a parser with these arguments; ``parse_tool_args`` parses and
merges the two spellings of the overrides into ``args.opts`` (a list, possibly empty).

Argument types that check values where they enter (argparse then names the option in its error):
``probability`` (a float in [0, 1]), ``positive_int``, ``non_negative_int`` and ``output_folder``
(a path that is a folder or does not exist yet).
"""

from __future__ import annotations

import argparse
import math
import os
import re
from typing import Optional, Sequence

from .data.cli import add_register_coco_argument

__all__ = [
    "add_opts_alias",
    "add_opts_argument",
    "add_threads_argument",
    "add_tool_arguments",
    "non_negative_int",
    "output_folder",
    "parse_tool_args",
    "positive_int",
    "probability",
    "set_torch_threads",
    "tool_argument_parser",
    "train_argument_parser",
]

_OPTS_ALIAS_DEST = "_opts_alias"
_CONFIG_KEY = re.compile(r"[A-Z][A-Z0-9_]*(\.[A-Z0-9_]+)+")  # e.g. SOLVER.MAX_ITER


def add_opts_argument(parser: argparse.ArgumentParser) -> None:
    """Add the trailing ``opts`` (``KEY VALUE`` pairs) and its alias ``--opts``."""
    parser.add_argument(
        "opts",
        nargs=argparse.REMAINDER,
        default=[],
        metavar="KEY VALUE",
        help="config overrides after all options, e.g. MODEL.WEIGHTS model.pth SOLVER.BASE_LR 0.01",
    )
    add_opts_alias(parser)


def add_opts_alias(parser: argparse.ArgumentParser) -> None:
    """Add ``--opts``, the alias of a parser's trailing ``opts`` (:func:`parse_tool_args` merges
    the two)."""
    parser.add_argument(
        "--opts",
        dest=_OPTS_ALIAS_DEST,
        nargs=argparse.REMAINDER,
        default=[],
        metavar="KEY VALUE",
        help="the same overrides, spelled as Detectron2's demo.py does (last option)",
    )


def add_threads_argument(parser: argparse.ArgumentParser) -> None:
    """Add ``--threads`` (torch threads for a benchmark; default 1, 0: torch's default), read by
    :func:`set_torch_threads`."""
    parser.add_argument(
        "--threads",
        type=non_negative_int,
        default=1,
        help="torch threads (0: torch default); see README",
    )


def set_torch_threads(threads: int) -> None:
    """``torch.set_num_threads(threads)`` when ``threads`` > 0; 0 keeps torch's default."""
    if threads > 0:
        import torch

        torch.set_num_threads(threads)


def tool_argument_parser(
    description: Optional[str] = None,
    *,
    epilog: Optional[str] = None,
    config_required: bool = True,
    reads_data: bool = True,
    several_configs: bool = False,
) -> argparse.ArgumentParser:
    """A parser with ``--config-file``, ``--register-coco`` (if ``reads_data``) and the overrides
    (:func:`add_tool_arguments`). The tool adds its own options to the parser it gets; the
    overrides stay last on the command line. Parse with :func:`parse_tool_args`."""
    parser = argparse.ArgumentParser(
        description=description,
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_tool_arguments(
        parser,
        config_required=config_required,
        reads_data=reads_data,
        several_configs=several_configs,
    )
    return parser


def add_tool_arguments(
    parser: argparse.ArgumentParser,
    *,
    config_required: bool = True,
    reads_data: bool = True,
    several_configs: bool = False,
) -> None:
    """Add ``--config-file``, ``--register-coco`` (if ``reads_data``) and the overrides to
    ``parser`` (e.g. a subcommand's parser).

    With ``several_configs``, ``--config-file`` takes one or more files, and may be repeated
    (``--config-file A.yaml B.yaml`` or ``--config-file A.yaml --config-file B.yaml``;
    ``args.config_file`` is a list).
    """
    parser.add_argument(
        "--config-file",
        required=config_required,
        nargs="+" if several_configs else None,
        action="extend" if several_configs else "store",
        metavar="FILE",
        help="musu or project config(s) (YAML)" if several_configs else "musu or project config",
    )
    if reads_data:
        add_register_coco_argument(parser)
    add_opts_argument(parser)


def train_argument_parser(epilog: Optional[str] = None) -> argparse.ArgumentParser:
    """Detectron2's ``default_argument_parser`` (``--config-file``, ``--resume``, ``--eval-only``,
    ``--num-gpus``, ``--num-machines``, ``--machine-rank``, ``--dist-url``, trailing ``opts``)
    with the ``--opts`` alias, ``--register-coco`` and ``--check-data``. Parse with
    :func:`parse_tool_args`."""
    from detectron2.engine import default_argument_parser

    parser = default_argument_parser(epilog)
    parser.description = "Train or evaluate a musu or project config with musu.engine.Trainer."
    add_register_coco_argument(
        parser, help="register a COCO-format dataset under NAME before training (repeatable)"
    )
    parser.add_argument(
        "--check-data",
        action="store_true",
        help="decode every image of DATASETS.TRAIN and DATASETS.TEST first and list all that "
        "cannot be read (costs one full decode of each dataset)",
    )
    add_opts_alias(parser)
    return parser


def parse_tool_args(
    parser: argparse.ArgumentParser,
    argv: Optional[Sequence[str]] = None,
    *,
    lazy_config: bool = False,
) -> argparse.Namespace:
    """Parse ``argv``; ``args.opts`` holds the overrides from either spelling, in order.

    With ``lazy_config`` the overrides are LazyConfig's ``key=value`` words
    (``train.max_iter=100``), as Detectron2's ``lazyconfig_train_net.py`` takes them, each checked
    to hold a ``=``.

    With several config files (``several_configs``), the first word that is a config key
    (``SOLVER.MAX_ITER``) and all after it are overrides: ``--config-file A.yaml B.yaml KEY
    VALUE``. Raises ``SystemExit`` (argparse's usage error) when the overrides are not ``KEY
    VALUE`` pairs.
    """
    args = parser.parse_args(argv)
    opts = list(getattr(args, "opts", None) or [])
    if isinstance(getattr(args, "config_file", None), list):
        # "--config-file A.yaml B.yaml KEY VALUE ...": the first config key ends the files.
        configs = args.config_file
        first_key = next((i for i, c in enumerate(configs) if _CONFIG_KEY.fullmatch(c)), None)
        if first_key is not None:
            args.config_file, opts = configs[:first_key], configs[first_key:] + opts
            if not args.config_file:
                parser.error(f"--config-file needs a config file before {configs[0]}")
    opts += list(getattr(args, _OPTS_ALIAS_DEST, None) or [])
    # The trailing opts take everything after them, "--opts" included: it only separates.
    opts = [word for word in opts if word != "--opts"]
    if hasattr(args, _OPTS_ALIAS_DEST):
        delattr(args, _OPTS_ALIAS_DEST)
    if opts and opts[0] == "--":
        opts = opts[1:]
    if lazy_config:
        malformed = [word for word in opts if "=" not in word]
        if malformed:
            parser.error(f"LazyConfig overrides are key=value words; got {' '.join(malformed)}")
    elif len(opts) % 2:
        parser.error(
            f"config overrides must be KEY VALUE pairs; got an odd number ({len(opts)}): "
            f"{' '.join(opts)}"
        )
    args.opts = opts
    return args


def probability(text: str) -> float:
    """A float in [0, 1] (a score or IoU threshold); ``ArgumentTypeError`` otherwise."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not (math.isfinite(value) and 0.0 <= value <= 1.0):
        raise argparse.ArgumentTypeError(f"{text} is outside [0, 1]")
    return value


def _integer(text: str, minimum: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"{text} is less than {minimum}")
    return value


def positive_int(text: str) -> int:
    """A whole number >= 1; ``ArgumentTypeError`` otherwise."""
    return _integer(text, 1)


def non_negative_int(text: str) -> int:
    """A whole number >= 0; ``ArgumentTypeError`` otherwise."""
    return _integer(text, 0)


def output_folder(text: str) -> str:
    """A folder path, existing or not yet created; ``ArgumentTypeError`` if it is a file."""
    if os.path.exists(text) and not os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text} exists and is not a folder")
    return text
