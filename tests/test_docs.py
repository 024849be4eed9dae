"""docs/runs.md against train.py's parser (harness/config.py): the table of all flags, their
defaults and what each needs, and the lists of flags that define a run and that may change
on resume."""
import os
import re

import pytest

from harness import config
from helpers import ROOT

RUNS_MD = os.path.join(ROOT, "docs", "runs.md")


def _text():
    with open(RUNS_MD, encoding="utf-8") as f:
        return f.read()


def _table():
    """{flag: meaning} of the rows of the "All flags" table, in order."""
    section = _text().split("## All flags", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| `-") and len(cells) == 2:
            flag = cells[0].strip("`").split()[0]
            assert flag not in rows, f"{flag} has two rows"
            rows[flag] = cells[1]
    return rows


def _parser_flags():
    """{option string: argparse action} of build_parser(), without -h/--help."""
    return {option: action for action in config.build_parser()._actions
            for option in action.option_strings if option not in ("-h", "--help")}


def _prose(sentence_start, end):
    """The flags (`--x`) named in runs.md from `sentence_start` up to `end`, and that text."""
    text = " ".join(_text().split())
    match = re.search(re.escape(sentence_start) + r"(.*?)" + re.escape(end), text)
    assert match, f"runs.md no longer says {sentence_start!r}"
    return re.findall(r"`--(\w+)`", match.group(1)), match.group(1)


def test_the_flags_table_has_a_row_for_every_flag_of_the_parser_and_no_other():
    table, parser = set(_table()), set(_parser_flags())
    assert len(table) > 30  # the table was found and parsed
    assert sorted(parser - table) == [], "flags of train.py missing from docs/runs.md"
    assert sorted(table - parser) == [], "flags in docs/runs.md that train.py does not take"


def _stated_default(meaning):
    # The default closes the row in parentheses: "(0.05)", "(`out`)", "(off)", "(none: float32)".
    match = re.search(r"\(([^()]*)\)$", meaning)
    assert match, f"no default at the end of {meaning!r}"
    return match.group(1).replace("`", "").split(":")[0].strip()


@pytest.mark.parametrize("flag", sorted(_parser_flags()))
def test_the_default_the_table_states_is_the_parsers(flag):
    meaning = _table().get(flag)
    if meaning is None:
        pytest.fail(f"{flag} has no row (see the test of the rows)")
    action = _parser_flags()[flag]
    expected = action.default
    if expected is None and action.dest in config.DEPENDENT:  # filled in after parsing
        expected = config.DEPENDENT[action.dest]
    stated = _stated_default(meaning)
    if expected is False:  # a switch
        assert stated == "off"
    elif expected is None:
        assert stated == "none"
    elif isinstance(expected, (int, float)):
        assert float(stated) == expected
    else:
        assert stated == expected


@pytest.mark.parametrize("dest", sorted(config.NEEDS))
def test_a_flag_needing_another_says_which_in_the_table(dest):
    needs = config.NEEDS[dest][0]  # in words: "--swa or --fge"
    assert f"with {needs} only" in _table()[f"--{dest}"].replace("`", "")


def test_the_flags_that_define_a_run_are_listed_as_identity_has_them():
    listed, _ = _prose("The flags that define it must be the run's:", ";")
    assert len(listed) == len(set(listed)), "a flag listed twice"
    assert sorted(listed) == sorted(config.IDENTITY)


def test_the_flags_that_may_change_on_resume_are_listed_as_may_change_has_them():
    listed, text = _prose("These may change:", ".")
    expected = re.findall(r"--(\w+)", " ".join(config.MAY_CHANGE))
    assert sorted(listed) == sorted(expected)
    assert ("number of processes" in text) == any("number of processes" in m for m in config.MAY_CHANGE)
    assert ("`--epochs` (upward)" in text) == ("--epochs (upward)" in config.MAY_CHANGE)
