"""README.md as a front page: what it names exists, and its "Which config do I use?" commands run.

* Every relative link of README.md and of the repository pages it links (one level) points to a
  file or folder that exists.
* Every repository path named in those pages (in backticks or code blocks: ``configs/...``,
  ``tools/...``, ``docs/...``, ...) with a file extension, or a ``*`` pattern, exists (matches).
* Each ``python train_net.py ...`` command of "Which config do I use?" parses with
  ``train_net.py``'s own parser, and its ``setup()`` builds the config (no training).
* README.md stays a front page: at most 200 lines.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Iterator, List, Tuple

import pytest

from musu.cli import parse_tool_args

import train_net  # the repository's train_net.py (conftest.py puts the root on sys.path)

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"

LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
CODE_SPAN = re.compile(r"`([^`\n]+)`")
CODE_BLOCK = re.compile(r"^```[^\n]*\n(.*?)^```", re.S | re.M)
# A repository path: a top-level folder of this repository, then a path with an extension.
REPO_PATH = re.compile(
    r"(?<![\w./~$-])((?:configs|tools|docs|tests|musu|projects)/[\w./*-]*\.(?:py|yaml|md|sh|png|"
    r"json|csv|cfg|toml))(?![\w/])"
)
ROOT_FILES = re.compile(r"(?<![\w./-])(train_net\.py|MODEL_ZOO\.md|setup\.cfg)(?![\w/])")


def local_links(page: Path) -> List[Tuple[str, Path]]:
    """(link as written, resolved path) of every relative link of ``page``, anchors dropped."""
    out = []
    for target in LINK.findall(page.read_text()):
        if re.match(r"[a-z]+://|mailto:|#", target):
            continue
        out.append((target, (page.parent / target.split("#", 1)[0]).resolve()))
    return out


def pages() -> List[Path]:
    """README.md and the repository's Markdown pages it links."""
    linked = [path for _, path in local_links(README)]
    found = [README]
    for path in linked:
        if path.is_dir() and (path / "README.md").is_file():
            path = path / "README.md"
        if path.suffix == ".md" and path not in found:
            found.append(path)
    return found


def named_paths(text: str) -> Iterator[str]:
    """Repository paths named in code spans and code blocks."""
    code = CODE_SPAN.findall(text) + CODE_BLOCK.findall(text)
    for chunk in code:
        yield from REPO_PATH.findall(chunk)
        yield from ROOT_FILES.findall(chunk)


PAGES = pages()
IDS = [p.relative_to(REPO).as_posix() for p in PAGES]


def test_readme_is_a_front_page() -> None:
    lines = README.read_text().splitlines()
    assert len(lines) <= 200, f"README.md has {len(lines)} lines; move detail to docs/"
    headings = [line for line in lines if line.startswith("## ")]
    order = ["## Quick start", "## Which config do I use?", "## Train on your own COCO-format data",
             "## Results", "## Map of the code", "## Links"]  # fmt: skip
    assert [h for h in headings if h in order] == order


@pytest.mark.parametrize("page", PAGES, ids=IDS)
def test_links_exist(page: Path) -> None:
    assert page.is_file(), f"README.md links to {page.relative_to(REPO)}, which does not exist"
    missing = [target for target, path in local_links(page) if not path.exists()]
    assert not missing, f"{page.relative_to(REPO)} links to missing files: {missing}"


@pytest.mark.parametrize("page", PAGES, ids=IDS)
def test_named_paths_exist(page: Path) -> None:
    """Paths are relative to the repository root (where commands run) or, in a project's README,
    to the project's folder."""
    assert page.is_file(), f"README.md links to {page.relative_to(REPO)}, which does not exist"
    missing = []
    for name in sorted(set(named_paths(page.read_text()))):
        roots = {REPO, page.parent}
        exists = any(
            any(root.glob(name)) if "*" in name else (root / name).exists() for root in roots
        )
        if not exists:
            missing.append(name)
    assert not missing, f"{page.relative_to(REPO)} names missing paths: {missing}"


def which_config_commands() -> List[List[str]]:
    """The ``python train_net.py`` commands of the README's "Which config do I use?"."""
    text = README.read_text()
    section = text.split("## Which config do I use?", 1)[1].split("\n## ", 1)[0]
    commands = []
    for block in CODE_BLOCK.findall(section):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words[:2] == ["python", "train_net.py"]:
                commands.append(words[2:])
    return commands


COMMANDS = which_config_commands()


def test_which_config_names_the_recommended_files() -> None:
    files = {argv[argv.index("--config-file") + 1] for argv in COMMANDS}
    assert files == {
        "configs/BCCD/musu_R_18_FPN_1800it.yaml",
        "configs/BCCD/fcos_R_18_FPN_1800it.yaml",
        "configs/COCO-Detection/musu_R_50_FPN_1x.yaml",
    }


@pytest.mark.parametrize("argv", COMMANDS, ids=[" ".join(a) for a in COMMANDS])
def test_which_config_commands_build_their_config(argv: List[str], tmp_path: Path) -> None:
    args = parse_tool_args(train_net.build_parser(), argv)
    args.opts = list(args.opts) + ["OUTPUT_DIR", str(tmp_path)]
    cfg = train_net.setup(args)
    assert cfg.is_frozen()
    assert (tmp_path / "config.yaml").is_file()  # default_setup wrote the merged config
    name = Path(args.config_file).name
    expected_arch = "D2FCOS" if name.startswith("fcos_") else "MuSu"
    assert cfg.MODEL.META_ARCHITECTURE == expected_arch
    if name == "musu_R_18_FPN_1800it.yaml":
        assert cfg.MODEL.MUSU.NUM_ANCHORS == 2 and list(cfg.MODEL.MUSU.ANCHOR_SIZES) == [4.0, 8.0]
        assert cfg.SOLVER.MAX_ITER == 1800 and not cfg.MODEL.MUSU.SHADOW_ASSIGNER
