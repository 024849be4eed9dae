"""Every command README.md and docs/*.md show for train.py, eval.py and the scripts is one their
parsers take as written (flags that exist, values in range, flags that go together): a
renamed or tightened flag cannot leave the docs behind. Placeholders (`...`, `<DIR>`,
`[--flag]`) mark commands that are templates, not commands, and are left out. The commands
come from scripts/run_documented_commands.py's extraction, which also runs them."""
import importlib.util
import os
import re
import shlex

import pytest

from helpers import ROOT, script

PROGRAMS = {"train.py": None, "eval.py": None, "scripts/average_checkpoints.py": "average_checkpoints",
            "scripts/export.py": "export", "scripts/flatness.py": "flatness",
            "scripts/compare.py": "compare"}


def _documented():
    """(file, command) of each part (`&&`) of a non-template documented command that runs one
    of PROGRAMS, from the extraction scripts/run_documented_commands.py runs them with."""
    runner = script("run_documented_commands")
    found = []
    for name, _, command in runner.documented_commands(ROOT):
        for part in ([] if runner.is_template(command) else command.split(" && ")):
            match = re.match(r"python (\S+)( .*)?$", part)
            if match and match[1] in PROGRAMS:
                found.append((name, part))
    return found


def _parse(program, argv):
    if program == "train.py":
        from harness import config
        return config.parse_args(argv)
    if program == "eval.py":
        spec = importlib.util.spec_from_file_location("eval_script", os.path.join(ROOT, "eval.py"))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module.build_parser().parse_args(argv)
    return script(PROGRAMS[program]).build_parser().parse_args(argv)


def test_the_docs_show_commands_of_each_program():
    programs = {re.search(r"python (\S+)", command)[1] for _, command in _documented()}
    assert {"train.py", "eval.py", "scripts/compare.py", "scripts/average_checkpoints.py"} <= programs


@pytest.mark.parametrize("where, command", _documented())
def test_a_documented_command_is_taken_by_its_parser(where, command):
    words = shlex.split(command)
    program, argv = words[1], words[2:]
    try:
        _parse(program, argv)
    except SystemExit as e:  # argparse refused it (and printed why), or printed --help
        assert e.code == 0, f"{where}: {command}: argparse exit {e.code}"
