"""The README's set-up commands are what CI runs."""
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ci_runs_the_readme_commands():
    readme = ROOT / "README.md"
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    commands = [line for line in ci if line and not line.startswith(("#", "set ", "cd ", "export "))]
    assert len(commands) == 2
    text = readme.read_text()
    for command in commands:
        assert f"```bash\n{command}\n```" in text, command
