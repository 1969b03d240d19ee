"""The README's list of commands is the registry's: every command's examples, in command order."""

from pathlib import Path

from qloc.cli import readme_commands

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_lists_every_command_as_the_registry_does():
    text = README.read_text()
    block = text.split("## Command line\n\n```bash\n", 1)[1].split("```", 1)[0]
    assert block == readme_commands() + "\n", (
        "README's command list differs from the commands' examples; paste qloc.cli.readme_commands()"
    )
