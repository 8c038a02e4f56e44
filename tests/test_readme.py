"""The README's set-up commands stay true: CI runs the test command verbatim."""

import re

from conftest import ROOT


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    commands = re.findall(r"```bash\n(.*?)\n```", readme.split("## Set up", 1)[1].split("\n## ", 1)[0], re.S)
    assert len(commands) == 2, "the README has exactly two set-up commands"
    ci_command = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert commands[1] == ci_command
