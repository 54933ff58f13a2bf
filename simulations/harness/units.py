"""The shipped systemd units (deploy/*/*.service), read so that tests start what they start.

A unit's `ExecStart` is the one command a hospital IT team installs. The deployment tests and
`simulations.harness.deploy.LocalDeployment` do not write their own SuperLink/SuperNode command
lines: they take the unit's, with its install paths replaced by test paths (`command`), so a unit
that drifts from the tested wrapper (another program, a lost argument) fails them.

    argv = command(SUPERLINK_UNIT, {"--port": "8123"}, {"/etc/fedvox/pki/": "/tmp/pki/"})
"""

from __future__ import annotations

import shlex
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

DEPLOY_DIR = Path(__file__).resolve().parents[2] / "deploy"
SUPERLINK_UNIT = DEPLOY_DIR / "server" / "fedvox-superlink.service"
SUPERNODE_UNIT = DEPLOY_DIR / "hospital" / "fedvox-supernode.service"
VENV_PYTHON = "/opt/fedvox/venv/bin/python"  # where the units (and the docs) install fedvox


class UnitError(RuntimeError):
    """A unit that no longer has what its tests substitute (names the unit and the item)."""


@dataclass(frozen=True)
class Unit:
    path: Path
    exec_start: tuple[str, ...]
    environment: dict[str, str] = field(default_factory=dict)
    working_directory: str = ""
    user: str = ""

    @property
    def program(self) -> tuple[str, ...]:
        """What runs, up to fedvox's `--`: e.g. ("python", "-m", "client.supernode")."""
        return program_of(self.exec_start)


def program_of(argv: tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """The program of a command line (python's path dropped, options and `--` left out)."""
    argv = list(argv)
    if argv and Path(argv[0]).name.startswith("python"):
        argv[0] = "python"
    if argv[:2] == ["python", "-m"]:
        return tuple(argv[:3])
    return tuple(argv[:1])


def read_unit(path: Path) -> Unit:
    """The [Service] settings of a systemd unit file (continuation lines joined)."""
    text = Path(path).read_text().replace("\\\n", " ")
    section, values, env = "", {}, {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
        elif section == "Service" and "=" in line:
            key, value = line.split("=", 1)
            if key == "Environment":
                name, val = value.split("=", 1)
                env[name] = val
            else:
                values[key] = value.strip()
    if "ExecStart" not in values:
        raise UnitError(f"{path}: no ExecStart in [Service]")
    return Unit(
        Path(path),
        tuple(shlex.split(values["ExecStart"])),
        env,
        values.get("WorkingDirectory", ""),
        values.get("User", ""),
    )


def command(
    path: Path,
    options: Mapping[str, str | None] = {},  # noqa: B006 - read only
    prefixes: Mapping[str, str] = {},  # noqa: B006 - read only
    python: str = sys.executable,
) -> list[str]:
    """The unit's ExecStart with this Python, `options` given new values (None: the option
    and its value are left out) and install-path `prefixes` replaced in every argument."""
    unit = read_unit(path)
    argv = list(unit.exec_start)
    if argv[0] != VENV_PYTHON:
        raise UnitError(f"{path}: ExecStart runs {argv[0]}, not fedvox's {VENV_PYTHON}")
    argv[0] = python
    for option, value in options.items():
        if option not in argv:
            raise UnitError(f"{path}: ExecStart has no {option}")
        i = argv.index(option)
        argv[i : i + 2] = [] if value is None else [option, value]
    for old, new in prefixes.items():
        argv = [new + a[len(old) :] if a.startswith(old) else a for a in argv]
    return argv
