"""Every command's flags, generated from its settings dataclasses, against the recorded lists.

``cli_flags_before.json`` holds the flags of every command before the parsers were generated from settings:
each must still exist. ``cli_flags.json`` holds today's full list, so that adding, renaming or losing a flag is a
visible change of that file (regenerate it with ``python tests/test_cli_flags.py``).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from wanda.cli.main import COMMANDS, Command

DATA = Path(__file__).resolve().parent / "data"


def current_flags() -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}

    def visit(table: dict, prog: str) -> None:
        for name, entry in table.items():
            full = f"{prog} {name}".strip()
            if isinstance(entry, Command):
                if full != "wanda finetune eval":  # the same command as 'wanda eval'
                    parser = entry.parser(full)
                    out[full] = sorted({o for action in parser._actions for o in action.option_strings})
            else:
                out[full] = ["--help", "-h"]
                visit(entry, full)

    visit(COMMANDS, "wanda")
    return out


@pytest.fixture(scope="module")
def flags() -> dict[str, list[str]]:
    return current_flags()


def test_every_flag_of_before_still_exists(flags):
    before = json.loads((DATA / "cli_flags_before.json").read_text())
    assert set(before) <= set(flags), f"commands lost: {sorted(set(before) - set(flags))}"  # new ones may be added
    for command, names in before.items():
        missing = set(names) - set(flags[command])
        assert not missing, f"{command} lost {sorted(missing)}"


def test_flags_are_the_recorded_ones(flags):
    assert flags == json.loads((DATA / "cli_flags.json").read_text())


def test_every_flag_has_help():
    for entry in COMMANDS.values():
        for command in entry.values() if isinstance(entry, dict) else [entry]:
            for action in command.parser("wanda")._actions:
                assert action.help, action.option_strings


if __name__ == "__main__":
    (DATA / "cli_flags.json").write_text(json.dumps(current_flags(), indent=1) + "\n")
    sys.exit(0)
