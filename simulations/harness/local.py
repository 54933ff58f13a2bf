"""Run fedvox on a private, local Flower simulation SuperLink — for tests and benchmarks.

`flwr run .` against Flower's built-in `local` connection starts a detached
SuperLink on a fixed port that outlives the command. Here we start our own
`flower-superlink --simulation` on free ports, with its own FLWR_HOME, and end it
(and everything it spawned) by PID when the block exits, even on failure.
"""

from __future__ import annotations

import json
import shlex
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from simulations.harness.procs import (
    VENV_BIN,
    ProcessGroup,
    Procs,
    flwr_env,
    free_port,
    port_open,
    wait_for,
)

PROJECT_DIR = Path(__file__).resolve().parents[2]


def toml_value(value: Any) -> str:
    """A run-config override value as TOML (strings quoted, as `flwr run -c` expects)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(str(value))


def run_config_arg(config: dict[str, Any]) -> str:
    return " ".join(f"{k}={toml_value(v)}" for k, v in config.items())


@dataclass
class RunResult:
    returncode: int
    output: str
    wall_s: float


class LocalFederation(ProcessGroup):
    """`with LocalFederation(workdir) as fed: fed.run({...}, num_supernodes=2)`."""

    def __init__(
        self, workdir: Path, app_dir: Path = PROJECT_DIR, extra_env: dict[str, str] | None = None
    ) -> None:
        self.workdir = Path(workdir)
        self.app_dir = app_dir
        self.flwr_home = self.workdir / "flwr-home"
        self.flwr_home.mkdir(parents=True, exist_ok=True)
        self.env = flwr_env(self.flwr_home, **(extra_env or {}))
        self.procs = Procs(self.workdir / "logs")
        self.port = free_port()

    def _start(self) -> None:
        control, fleet, health = free_port(), free_port(), free_port()
        (self.flwr_home / "config.toml").write_text(
            '[superlink]\ndefault = "fedvox-local"\n\n'
            f'[superlink.fedvox-local]\naddress = "127.0.0.1:{self.port}"\ninsecure = true\n'
        )
        self.superlink = self.procs.start(
            "superlink",
            [
                str(VENV_BIN / "flower-superlink"),
                "--insecure",
                "--simulation",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--control-api-address",
                f"127.0.0.1:{control}",
                "--fleet-api-address",
                f"127.0.0.1:{fleet}",
                "--health-server-address",
                f"127.0.0.1:{health}",
                "--database",
                str(self.flwr_home / "state.db"),
                "--disable-runtime-dependency-installation",
            ],
            env=self.env,
        )
        wait_for(
            lambda: port_open(self.port) or self.superlink.poll() is not None,
            60,
            "the simulation SuperLink",
            self.superlink.log,
        )
        if self.superlink.poll() is not None:
            raise RuntimeError(f"flower-superlink exited:\n{self.superlink.log()[-3000:]}")

    def run(
        self,
        run_config: dict[str, Any],
        num_supernodes: int,
        num_cpus: float = 1,
        timeout: float = 900,
        name: str | None = None,
    ) -> RunResult:
        """`flwr run` the app with `run_config` overrides; returns exit code and output."""
        federation = f"num-supernodes={num_supernodes} client-resources-num-cpus={num_cpus}"
        argv = [
            str(VENV_BIN / "flwr"),
            "run",
            str(self.app_dir),
            "fedvox-local",
            "--stream",
            "--federation-config",
            federation,
            "-c",
            run_config_arg(run_config),
        ]
        t0 = time.monotonic()
        rc, out = self.procs.run(name or f"flwr-run-{int(t0)}", argv, env=self.env, timeout=timeout)
        self.superlink.remember_descendants()
        return RunResult(rc, out, time.monotonic() - t0)

    def command_line(self, run_config: dict[str, Any], num_supernodes: int) -> str:
        return shlex.join(
            [
                "flwr",
                "run",
                ".",
                "fedvox-local",
                "--stream",
                "--federation-config",
                f"num-supernodes={num_supernodes}",
                "-c",
                run_config_arg(run_config),
            ]
        )
