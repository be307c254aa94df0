"""README.md and docs/*.md against the code a user runs: every ``kocr`` / ``python -m kocr.recipe``
command line they quote names a real subcommand and only flags its parser has, every ``kocr``
subcommand and every params.yaml key is documented somewhere, and every link between the pages
(``data.md#ingestion``) lands on a file and a heading that exist (GitHub's anchor rules)."""

from __future__ import annotations

import argparse
import re
from collections import Counter
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
# a command in a code span or block: kocr SUB (or torchrun's -m kocr.cli SUB), python -m kocr.recipe SUB
COMMAND = re.compile(r"(?<![\w.-])(?:(python3? -m kocr\.recipe)|kocr|-m kocr\.cli)\s+([a-z][\w-]*)")
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def _flags(parser: argparse.ArgumentParser) -> set[str]:
    return {option for action in parser._actions for option in action.option_strings}


def _code(text: str) -> list[tuple[int, str]]:
    """(line number, text) of each fenced block's lines (a trailing ``\\`` joins the next) and each
    inline code span elsewhere."""
    found, fenced, held = [], False, ""
    for number, line in enumerate(text.splitlines(), 1):
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        if fenced:
            held += line
            if line.rstrip().endswith("\\"):
                held = held.rstrip()[:-1] + " "
                continue
            found.append((number, held.split(" # ")[0]))  # not a comment's words
            held = ""
        else:
            found += [(number, span) for span in re.findall(r"`([^`]+)`", line)]
    return found


def _quoted_commands() -> list[tuple[str, str, str, set[str]]]:
    """(where, program, subcommand, flags given to it) of every command line the docs quote."""
    commands = []
    for doc in DOCS:
        for number, code in _code(doc.read_text(encoding="utf-8")):
            matches = list(COMMAND.finditer(code))
            for i, match in enumerate(matches):
                end = matches[i + 1].start() if i + 1 < len(matches) else len(code)
                args = re.split(r"&&|;|\|\|", code[match.end():end])[0]  # the next shell command is another's
                commands.append((f"{doc.relative_to(REPO)}:{number}", "recipe" if match.group(1) else "kocr",
                                 match.group(2), set(FLAG.findall(args))))
    return commands


def test_quoted_commands_exist_with_their_flags():
    from kocr.cli import build_parser
    from kocr.recipe import build_parser as recipe_parser

    programs = {"kocr": _subparsers(build_parser()), "recipe": _subparsers(recipe_parser())}
    commands = _quoted_commands()
    assert len(commands) > 50, "the docs' command lines were not found: the parsing above broke"
    wrong = []
    for where, program, sub, flags in commands:
        if sub not in programs[program]:
            wrong.append(f"{where}: no subcommand {program} {sub}")
        elif flags - _flags(programs[program][sub]):
            wrong.append(f"{where}: {program} {sub} has no {', '.join(sorted(flags - _flags(programs[program][sub])))}")
    assert not wrong, "\n".join(wrong)


def test_every_subcommand_is_documented():
    from kocr.cli import build_parser
    from kocr.recipe import build_parser as recipe_parser

    quoted = {(program, sub) for _, program, sub, _ in _quoted_commands()}
    missing = [f"kocr {sub}" for sub in _subparsers(build_parser()) if ("kocr", sub) not in quoted]
    missing += [f"python -m kocr.recipe {sub}" for sub in _subparsers(recipe_parser()) if ("recipe", sub) not in quoted]
    assert not missing, f"not in README.md or docs/: {missing}"


def _keys(mapping: dict, prefix: str = ""):
    for key, value in mapping.items():
        name = f"{prefix}{key}"
        yield name
        # tune.space entries are the user's own names; backgrounds/distortion map kinds to weights; mix: paths
        if isinstance(value, dict) and name not in ("tune.space", "synth_lines.backgrounds",
                                                    "synth_lines.distortion", "train.mix"):
            yield from _keys(value, name + ".")


def test_every_params_key_is_documented():
    """Each key of params.yaml is named in the docs: as ``section.key``, or as the key in code on a
    page that names its section (``prepare.seed``; ``seed`` on a page naming ``prepare``)."""
    params = yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8"))
    pages = [doc.read_text(encoding="utf-8") for doc in DOCS]
    missing = []
    for name in _keys(params):
        section, _, leaf = name.rpartition(".")
        key = re.escape(leaf)  # in a code span, or as a YAML key in a block (`median: {n_startup_trials: 2}`)
        leaf_in_code = re.compile(rf"`[^`\n]*(?<![\w.]){key}(?![\w])[^`\n]*`|(?:^\s*|[{{,]\s*){key}:", re.M)
        top = name.split(".")[0]
        if not any(name in page or (section and top in page and leaf_in_code.search(page)) for page in pages):
            missing.append(name)
    assert not missing, f"params.yaml keys no page of README.md or docs/ names: {missing}"


def _anchor(heading: str) -> str:
    """GitHub's id for a heading: lower case, punctuation but ``-`` and ``_`` dropped, spaces to ``-``."""
    text = re.sub(r"`|\*\*|\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _anchors(doc: Path) -> set[str]:
    anchors, seen, fenced = set(), Counter(), False
    for line in doc.read_text(encoding="utf-8").splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
        heading = None if fenced else re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if heading:
            slug = _anchor(heading.group(1))
            anchors.add(slug if not seen[slug] else f"{slug}-{seen[slug]}")
            seen[slug] += 1
    return anchors


@pytest.mark.parametrize("doc", DOCS, ids=lambda doc: doc.name)
def test_links_between_the_pages_resolve(doc):
    broken = []
    for number, line in enumerate(doc.read_text(encoding="utf-8").splitlines(), 1):
        for target in re.findall(r"\]\(([^)\s]+)\)", line):
            if re.match(r"[a-z]+:", target):
                continue
            path, _, anchor = target.partition("#")
            linked = (doc.parent / path) if path else doc
            if not linked.exists():
                broken.append(f"{number}: {target}: no such file")
            elif anchor and linked.suffix == ".md" and anchor not in _anchors(linked):
                broken.append(f"{number}: {target}: no such heading in {linked.name}")
    assert not broken, f"{doc.name}:\n" + "\n".join(broken)


def test_anchor_rules():
    assert _anchor("Mixing training sets: `train.mix`") == "mixing-training-sets-trainmix"
    assert _anchor("6. Retraining in CI: the self-hosted runner") == "6-retraining-in-ci-the-self-hosted-runner"
    assert _anchor("report.json reasons") == "reportjson-reasons"
