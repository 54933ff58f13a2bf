"""A real deployment on 127.0.0.1, as docs/deployment.md builds it, for tests and benchmarks.

    with LocalDeployment(root) as dep:          # CA + TLS SuperLink (--enable-supernode-auth,
        dep.add_hospitals({"h1": site1, ...})   #   --database) + nginx (Fleet only, if installed)
        dep.start_nodes()                       # one SuperNode per hospital (client.supernode)
        result = dep.run({...})                 # `fedvox run` -> exit code + summary.json

The SuperLink and the SuperNodes are started from the shipped systemd units' own ExecStart
(deploy/server/fedvox-superlink.service, deploy/hospital/fedvox-supernode.service, read by
`simulations.harness.units`), with this machine's paths and ports. Every hospital has its own key
(registered with `--name`), node config, state dir and FLWR_HOME, as on its own machine.
Every process is started through `simulations.harness.procs` and ended by PID when the block exits,
even on failure; nothing is killed by name.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common import certs
from simulations.harness import units
from simulations.harness.local import PROJECT_DIR, run_config_arg
from simulations.harness.procs import (
    Proc,
    ProcessGroup,
    Procs,
    flwr_env,
    free_port,
    port_open,
    wait_for,
)

OPERATOR = "fedvox-deploy"
NGINX_CONF = PROJECT_DIR / "deploy" / "nginx" / "fedvox-fleet.conf"
NGINX = shutil.which("nginx") or next(
    (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if Path(p).exists()), None
)
POLICY = {"accountant": "rdp", "max-epsilon": "24.0", "delta": "1e-5", "max-evaluations": "2"}

# Registers many keys through one Control API client (one `flwr supernode register` process
# per hospital costs seconds each on a busy machine).
_REGISTER = """
import sys
from flwr.cli.flower_config import read_superlink_connection
from flwr.cli.supernode.register import _register_node, try_load_public_key
from flwr.cli.utils import init_http_client_from_connection
client = init_http_client_from_connection(read_superlink_connection(sys.argv[1]))
for arg in sys.argv[2:]:
    name, key = arg.split("=", 1)
    _register_node(client, try_load_public_key(__import__("pathlib").Path(key)), False, name=name)
client.close()
"""


@dataclass
class RunOutcome:
    returncode: int
    output: str
    wall_s: float
    summary: dict[str, Any] | None


class LocalDeployment(ProcessGroup):
    def __init__(self, root: Path, nginx: bool = True, database: bool = True) -> None:
        self.root = Path(root)
        self.pki = self.root / "pki"
        self.home = self.root / "flwr-home"
        self.home.mkdir(parents=True, exist_ok=True)
        self.procs = Procs(self.root / "logs")
        self.env = flwr_env(self.home)
        self.superlink_port = free_port()
        self.proxy_port = free_port() if (nginx and NGINX) else None
        self.database = self.root / "superlink.db" if database else None
        self.superlink: Proc | None = None
        self.nodes: dict[str, Proc] = {}
        self.node_configs: dict[str, dict[str, str]] = {}
        self._node_args: dict[str, tuple[tuple[str, ...], str]] = {}

    # -- the server side ------------------------------------------------------------------
    def _start(self) -> None:
        certs.init_ca(self.pki, ["127.0.0.1"])
        self._operator_config()
        self.start_superlink()
        if self.proxy_port:
            self._start_nginx()

    def start_superlink(self) -> Proc:
        """The SuperLink as deploy/server/fedvox-superlink.service starts it (its ExecStart,
        with this machine's paths and port)."""
        argv = units.command(
            units.SUPERLINK_UNIT,
            {
                "--port": str(self.superlink_port),
                "--database": str(self.database) if self.database is not None else None,
            },
            {"/etc/fedvox/pki/": f"{self.pki}/"},
        )
        self.superlink = self.procs.start("superlink", argv, self.env, cwd=self.root)
        wait_for(lambda: port_open(self.superlink_port), 90, "the SuperLink", self.logs)
        return self.superlink

    def kill_superlink(self) -> None:
        """kill -9 the SuperLink process alone (what a crash or an OOM kill does)."""
        assert self.superlink is not None
        self.superlink.remember_descendants()
        os.kill(self.superlink.pid, signal.SIGKILL)
        self.superlink.popen.wait(timeout=30)

    @property
    def hospital_address(self) -> str:
        return f"127.0.0.1:{self.proxy_port or self.superlink_port}"

    def _operator_config(self) -> None:
        (self.home / "config.toml").write_text(
            textwrap.dedent(f"""\
            [superlink]
            default = "{OPERATOR}"

            [superlink.{OPERATOR}]
            address = "127.0.0.1:{self.superlink_port}"
            root-certificates = "{self.pki / "ca.crt"}"
            """)
        )

    def _start_nginx(self) -> None:
        conf = nginx_conf(self.root, self.pki, self.proxy_port, self.superlink_port)
        argv = [NGINX, "-p", str(conf.parent), "-c", str(conf), "-g", "daemon off;"]
        self.procs.start("nginx", argv, self.env)
        wait_for(lambda: port_open(self.proxy_port), 30, "nginx", self.logs)

    # -- hospitals --------------------------------------------------------------------------
    def add_hospitals(self, sites: dict[str, Path], **policy: str) -> None:
        """Keys, registration (named after the hospital) and node config for each site."""
        pairs = []
        for name, site in sites.items():
            key = certs.node_key(self.root / "keys", name)["private"]
            pairs.append(f"{name}={key}.pub")
            self.node_configs[name] = {
                "data-dir": str(site),
                "state-dir": str(self.state_dir(name)),
                "site-name": name,
                **POLICY,
                **policy,
            }
        argv = [sys.executable, "-c", _REGISTER, OPERATOR, *pairs]
        rc, out = self.procs.run("register", argv, self.env, cwd=self.root, timeout=300)
        if rc != 0:
            raise RuntimeError(f"registering the hospitals failed:\n{out[-3000:]}")

    def state_dir(self, name: str) -> Path:
        return self.root / "state" / name

    def start_node(self, name: str, extra: tuple[str, ...] = (), mode: str = "warm") -> Proc:
        """A hospital's SuperNode: fedvox's node wrapper (client/supernode.py), "warm" or
        "cold" (a fresh ClientApp process per message), or Flower's plain "flower-supernode"."""
        cfg = " ".join(f'{k}="{v}"' for k, v in self.node_configs[name].items())
        node = {
            "--superlink": self.hospital_address,
            "--root-certificates": str(self.pki / "ca.crt"),
            "--auth-supernode-private-key": str(self.root / "keys" / name),
            "--node-config": cfg,
        }
        if mode == "flower":
            argv = ["flower-supernode", *(a for kv in node.items() for a in kv)]
        else:  # the hospital unit's ExecStart (deploy/hospital/fedvox-supernode.service)
            argv = units.command(units.SUPERNODE_UNIT, {"--approved-fabs": None, **node})
            if mode == "cold":
                argv.insert(argv.index("--"), "--cold")
        argv += ["--port", str(free_port()), *extra]
        self._node_args[name] = (extra, mode)
        env = flwr_env(self.root / f"flwr-home-{name}")  # each hospital: its own machine
        self.nodes[name] = self.procs.start(f"node-{name}", argv, env, cwd=PROJECT_DIR)
        return self.nodes[name]

    def start_nodes(self, names: list[str] | None = None, timeout: float = 180) -> None:
        for name in names or list(self.node_configs):
            self.start_node(name)
        for name in names or list(self.node_configs):
            self.wait_connected(name, timeout)

    def wait_connected(self, name: str, timeout: float = 180, tries: int = 3) -> None:
        for attempt in range(tries):
            node = self.nodes[name]
            wait_for(
                lambda n=node: n.log().count("SuperNode ID") >= 1 or n.poll() is not None,
                timeout,
                f"SuperNode {name} to connect",
                self.logs,
            )
            if node.poll() is None:
                return
            if attempt == tries - 1 or "address already in use" not in node.log():
                raise RuntimeError(f"SuperNode {name} exited:\n{node.log()[-3000:]}")
            # Its free port was taken between free_port() and the bind (a busy host): again.
            self.start_node(name, *self._node_args[name])

    def kill_node(self, name: str) -> None:
        """kill -9 the hospital's SuperNode process (its SuperExec and ClientApp follow it)."""
        node = self.nodes[name]
        node.remember_descendants()
        os.kill(node.pid, signal.SIGKILL)
        node.popen.wait(timeout=30)

    # -- runs -------------------------------------------------------------------------------
    def run(
        self,
        config: dict[str, Any],
        timeout: float = 900,
        name: str = "run",
        app_dir: Path = PROJECT_DIR,
    ) -> RunOutcome:
        """`fedvox run` (Flower's `flwr run`, waited for; exit code from the run's status) of
        the app in `app_dir` (default: fedvox itself)."""
        argv = [sys.executable, "-m", "simulations.cli", "run", str(app_dir), OPERATOR]
        argv += ["--stream", "-c", run_config_arg(config)]
        t0 = time.monotonic()
        rc, out = self.procs.run(name, argv, self.env, cwd=self.root, timeout=timeout)
        summary = None
        if config.get("output-dir") and config.get("run-name"):
            path = Path(config["output-dir"]) / str(config["run-name"]) / "summary.json"
            summary = json.loads(path.read_text()) if path.exists() else None
        return RunOutcome(rc, out, time.monotonic() - t0, summary)

    def logs(self) -> str:
        return "\n".join(f"===== {p.name}\n{p.log()[-2500:]}" for p in self.procs.procs)


def nginx_conf(root: Path, pki: Path, proxy_port: int, superlink_port: int) -> Path:
    """The shipped deploy/nginx/fedvox-fleet.conf with only its CHANGE lines filled in, in a
    tmp prefix (no daemon, its own pid and log files)."""
    text = NGINX_CONF.read_text()
    for old, new in [
        ("listen 443 ssl;", f"listen 127.0.0.1:{proxy_port} ssl;"),
        ("/etc/fedvox/pki/", f"{pki}/"),
        ("https://127.0.0.1:8000$uri", f"https://127.0.0.1:{superlink_port}$uri"),
    ]:
        if old not in text:
            raise RuntimeError(f"{NGINX_CONF} no longer contains {old!r}")
        text = text.replace(old, new)
    ng = root / "nginx"
    (ng / "logs").mkdir(parents=True, exist_ok=True)
    (ng / "fedvox-fleet.conf").write_text(text)
    temp = " ".join(
        f"{k}_temp_path {ng}/{k};" for k in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    user = "user root;" if os.geteuid() == 0 else ""  # workers as `nobody` can't read tmp
    (ng / "nginx.conf").write_text(
        textwrap.dedent(f"""\
        worker_processes 1;
        {user}
        error_log {ng}/logs/error.log;
        pid {ng}/nginx.pid;
        events {{ worker_connections 1024; }}
        http {{
            access_log {ng}/logs/access.log;
            {temp}
            include {ng}/fedvox-fleet.conf;
        }}
        """)
    )
    return ng / "nginx.conf"
