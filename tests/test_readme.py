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


def test_what_exists_names_every_registered_thing():
    """The README's "What exists" table is documentation of the registries: every registered method, loss,
    encoder, schedule, dataset and model is named there (a new entry fails this until the docs say it)."""
    from fmkt.data import list_datasets
    from fmkt.distillers import METHODS
    from fmkt.flow.encoders import ENCODERS
    from fmkt.flow.schedules import SCHEDULES
    from fmkt.losses import LOSSES
    from fmkt.models import list_models

    text = (ROOT / "README.md").read_text()
    table = text[text.index("## What exists"):text.index("## The method in a paragraph")]
    missing = [name for names in (METHODS, LOSSES, ENCODERS, SCHEDULES, list_datasets(), list_models())
               for name in names if name not in table]
    assert missing == []
