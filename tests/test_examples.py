"""Examples the README shows run as shown, from any folder."""
import os
import re
import subprocess
import sys

from helpers import ROOT


def test_the_fit_example_runs_from_any_folder_and_the_readme_shows_its_code(tmp_path):
    example = os.path.join(ROOT, "scripts", "fit_example.py")
    result = subprocess.run([sys.executable, example], cwd=tmp_path, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = (result.stdout + result.stderr).strip().splitlines()
    assert len(lines) == 1 and re.fullmatch(r"test accuracy: SWA \d+\.\d\d%, SGD \d+\.\d\d%", lines[0]), lines
    swa, sgd = map(float, re.findall(r"(\d+\.\d\d)%", lines[0]))
    assert swa > 90 and sgd > 90  # both trained: digits is easy
    readme = open(os.path.join(ROOT, "README.md")).read()
    shown = readme.split("## The fit callback")[1].split("```python\n")[1].split("```")[0]
    code = open(example).read()
    for line in shown.strip().splitlines():
        assert line.strip() in code, line
