"""docs/deployment.md, followed to the letter in a fresh directory layout.

Every fenced block of the page whose first line says where it runs (`# server, as root`,
`# each hospital, as root`, `# operator`, ...) is executed in the page's order with bash, on
three "machines" (a server with its operator, hospital-a, hospital-b), each a tmp folder
standing in for `/` (`/etc`, `/var/lib`, `/srv`, `/data` and the homes live under it).
What a test cannot do literally, and what it does instead:

- root-only changes to the machine (`useradd`, `usermod`, `chown`, `chgrp`, `apt-get`, `ufw`,
  `install`'s `-o/-g`) are left out; modes (`chmod`, `install -m`) are applied;
- the venv is this test's own (`/opt/fedvox/venv/bin/` -> its bin folder), nothing is installed;
- `systemctl enable --now <unit>` starts the installed unit's own ExecStart (its install paths
  moved under the tmp root, a free port) as a real process on 127.0.0.1; `nginx -t && systemctl
  reload nginx` starts the shipped nginx conf (skipped without nginx: hospitals then dial the
  SuperLink's port);
- `runuser -u fedvox --` runs the command as this user; `fl.example.org` is 127.0.0.1;
- what the page says to edit or send is done as it says: the CHANGE lines of node.toml and the
  unit (site-name, data-dir, key name, server address), `ca.crt` to each hospital, each
  hospital's `.pub` to the operator; the operator's register line runs once per hospital key;
- the run is CI-sized: tiny phantom sites and `num-server-rounds=2 batch-size=16`.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

from procs import Procs, flwr_env, free_port, port_open, wait_for
from test_deployment import _write_sites

from simulations.harness import units
from simulations.harness.deploy import NGINX, nginx_conf

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs" / "deployment.md"
HOSPITALS = ("hospital-a", "hospital-b")
WHERE = {
    "# server and each hospital, as root": ("server", *HOSPITALS),
    "# server, as root": ("server",),
    "# each hospital, as root": HOSPITALS,
    "# operator": ("operator",),
}
LEFT_OUT = ("useradd", "usermod", "chown", "chgrp", "apt-get", "ufw")
SYSTEM_PATH = re.compile(r"(?<![\w./-])/(etc|var/lib|srv|data)/")
HEX64 = re.compile(r"\b[0-9a-f]{64}\b")


def blocks(text: str) -> list[tuple[tuple[str, ...], list[str]]]:
    """(machines, command lines) of every block that says where it runs, in order."""
    out = []
    for body in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        lines = [ln for ln in body.replace("\\\n", " ").splitlines() if ln.strip()]
        if lines and lines[0].strip() in WHERE:
            out.append((WHERE[lines[0].strip()], lines[1:]))
    return out


def _each(line: str) -> tuple[str, ...]:
    return HOSPITALS if "hospital-a" in line else ("hospital-a",)


class Walk:
    def __init__(self, tmp: Path, procs: Procs) -> None:
        self.tmp, self.procs = tmp, procs
        self.port, self.proxy = free_port(), (free_port() if NGINX else None)
        self.announced: str | None = None
        self.nodes: dict[str, object] = {}
        for m in ("server", *HOSPITALS):
            for sub in ("etc/systemd/system", "etc/nginx/conf.d", "root", "home/operator"):
                (self.root(m) / sub).mkdir(parents=True, exist_ok=True)

    def root(self, machine: str) -> Path:
        return self.tmp / ("server" if machine == "operator" else machine)

    def home(self, machine: str) -> Path:
        return self.root(machine) / ("home/operator" if machine == "operator" else "root")

    def address(self) -> str:
        return f"127.0.0.1:{self.proxy or self.port}"

    def moved(self, text: str, machine: str) -> str:
        """The page's absolute paths, on this machine's tmp root."""
        text = text.replace("/opt/fedvox/venv/bin/", f"{Path(sys.executable).parent}/")
        text = text.replace("/path/to/fedvox", str(ROOT))
        text = text.replace("/path/to/holdout", str(self.tmp / "holdout"))
        text = text.replace("fl.example.org:443", self.address())
        text = text.replace("fl.example.org", "127.0.0.1")
        return SYSTEM_PATH.sub(lambda m: f"{self.root(machine)}/{m[1]}/", text)

    def env(self, machine: str) -> dict[str, str]:
        env = flwr_env(self.tmp / "unused", HOME=str(self.home(machine)))
        env.pop("FLWR_HOME")  # the operator's connection is ~/.flwr/config.toml, as documented
        return env

    # -- one block on one machine ---------------------------------------------------------
    def run_block(self, machine: str, lines: list[str]) -> str:
        name = machine if machine in HOSPITALS else "hospital-a"
        if machine == "operator":  # once per hospital key: `register` of each .pub
            lines = [ln.replace("hospital-a", h) for ln in lines for h in _each(ln)]
        cwd, script, output = self.home(machine), [], []
        for line in lines:
            line = self.moved(line.replace("hospital-a", name), machine)
            if line.startswith("cd "):
                cwd = Path(line[3:].strip().replace("~", str(self.home(machine))))
                continue
            if "systemctl enable --now" in line or line.startswith("nginx -t"):
                output.append(self._bash(machine, script, cwd))
                script = []
                self._service(machine, line.split()[-1])
                continue
            parts = [self._literal(p) for p in line.split(" && ")]
            script += [p for p in parts if p]
        output.append(self._bash(machine, script, cwd))
        return "".join(output)

    @staticmethod
    def _literal(part: str) -> str:
        words = part.split()
        if not words or words[0] in LEFT_OUT or words[:2] in (["systemctl", "daemon-reload"],):
            return ""
        if words[:3] == ["python3", "-m", "venv"] or (
            len(words) > 1 and words[1] == "install" and words[0].endswith("/pip")
        ):
            return ""  # fmt: skip
        part = part.replace("runuser -u fedvox -- ", "")
        return re.sub(r"^install (.*?)-o \S+ -g \S+ ", r"install \1", part)

    def _bash(self, machine: str, script: list[str], cwd: Path) -> str:
        if not script:
            return ""
        argv = ["bash", "-euo", "pipefail", "-c", "\n".join(script)]
        rc, out = self.procs.run(f"{machine}-step", argv, self.env(machine), cwd=cwd, timeout=900)
        assert rc == 0, f"{machine}: {script}\n{out[-6000:]}"
        return out

    # -- services --------------------------------------------------------------------------
    def _service(self, machine: str, unit: str) -> None:
        root = self.root(machine)
        if unit == "nginx":
            if NGINX:
                conf = nginx_conf(root / "nginx", root / "etc/fedvox/pki", self.proxy, self.port)
                self.procs.start("nginx", [NGINX, "-p", str(conf.parent), "-c", str(conf),
                                           "-g", "daemon off;"], self.env(machine))  # fmt: skip
                wait_for(lambda: port_open(self.proxy), 30, "nginx", self.logs)
            return
        path = root / "etc/systemd/system" / f"{unit}.service"
        if unit == "fedvox-supernode":  # "edit hospital-a and fl.example.org in the unit"
            path.write_text(path.read_text().replace("hospital-a", machine)
                            .replace("fl.example.org:443", self.address()))  # fmt: skip
        moves = {f"/{p}/": f"{root}/{p}/" for p in ("etc", "var/lib", "srv", "data")}
        options = {"--port": str(self.port)} if unit == "fedvox-superlink" else {}
        argv = units.command(path, options, moves)
        if unit == "fedvox-supernode":
            argv += ["--port", str(free_port())]  # two "machines" share one loopback
        spec = units.read_unit(path)
        env = {
            **self.env(machine),
            **{k: self.moved(v, machine) for k, v in spec.environment.items()},
        }
        env["OMP_NUM_THREADS"] = "1"
        cwd = Path(self.moved(spec.working_directory, machine))
        proc = self.procs.start(f"{machine}-{unit}", argv, env, cwd=cwd)
        if unit == "fedvox-superlink":
            wait_for(lambda: port_open(self.port), 120, "the SuperLink unit", self.logs)
        else:
            wait_for(lambda: "SuperNode ID" in proc.log() or proc.poll() is not None, 300,
                     f"{machine}'s node unit to connect", self.logs)  # fmt: skip
            assert proc.poll() is None, proc.log()[-4000:]
            self.nodes[machine] = proc

    def logs(self) -> str:
        return "\n".join(f"===== {p.name}\n{p.log()[-2500:]}" for p in self.procs.procs)

    # -- what the page says to edit or send --------------------------------------------------
    def after_block(self, machine: str) -> None:
        root = self.root(machine)
        node_toml = root / "etc/fedvox/node.toml"
        if machine in HOSPITALS and node_toml.is_file() and "CHANGE" in node_toml.read_text():
            text = node_toml.read_text().replace("hospital-a", machine)
            node_toml.write_text(self.moved(text.replace("# CHANGE", ""), machine))
        flwr = self.home("operator") / ".flwr" / "config.toml"
        if machine == "operator" and flwr.is_file():
            text = flwr.read_text().replace("127.0.0.1:8000", f"127.0.0.1:{self.port}")
            flwr.write_text(self.moved(text, "server"))

    def send(self) -> None:
        """ca.crt to each hospital, each hospital's .pub to the operator."""
        ca = self.root("server") / "etc/fedvox/pki/ca.crt"
        for h in HOSPITALS:
            if ca.is_file():
                shutil.copy(ca, self.home(h) / "ca.crt")
            pub = self.root(h) / f"etc/fedvox/keys/{h}.pub"
            if pub.is_file():
                shutil.copy(pub, self.home("operator") / pub.name)


def test_following_the_deployment_page_literally_runs_two_hospitals_two_rounds(tmp_path):
    _write_sites(tmp_path / "sites", {"hospital-a": 40, "hospital-b": 40, "holdout": 30})
    for h in HOSPITALS:  # each hospital's data where its node.toml says: /data/fedvox/site
        (tmp_path / h / "data/fedvox").mkdir(parents=True)
        shutil.move(tmp_path / "sites" / h, tmp_path / h / "data/fedvox/site")
    shutil.move(tmp_path / "sites" / "holdout", tmp_path / "holdout")
    steps = blocks(DOCS.read_text())
    assert len(steps) >= 10, "docs/deployment.md lost its step-by-step blocks"
    with Procs(tmp_path / "logs") as procs:
        walk = Walk(tmp_path, procs)
        outputs: dict[str, list[str]] = {}
        for machines, lines in steps:
            for machine in machines:
                walk.send()
                text = " ".join(lines)
                if "fedvox run" in text:
                    lines = [ln.replace("num-server-rounds=10", "num-server-rounds=2 batch-size=16")
                             for ln in lines]  # fmt: skip
                out = walk.run_block(machine, lines)
                outputs.setdefault(machine, []).append(out)
                if machine == "operator" and "client.approval hash" in text:
                    walk.announced = HEX64.findall(out)[-1]
                if machine in HOSPITALS and "client.approval hash" in text:
                    assert HEX64.findall(out)[0] == walk.announced  # the hash the operator said
                walk.after_block(machine)
        # Every hospital connected through its own unit, and the run finished (fedvox run: 0).
        assert set(walk.nodes) == set(HOSPITALS)
        summary_path = tmp_path / "server/srv/fedvox/runs/study-1/summary.json"
        summary = json.loads(summary_path.read_text())
        assert summary["status"] == "finished", summary.get("reason")
        rounds = {r["round"]: r for r in summary["rounds"]}
        for h in HOSPITALS:
            assert rounds[2]["hospitals"][h]["status"] == "ok", rounds[2]["hospitals"]
            # The hospital's audit line of its approval, as the page's last step shows it.
            checks = [json.loads(x) for x in outputs[h][-1].splitlines() if x.startswith("{")]
            assert checks and checks[-1]["status"] == "approved", outputs[h][-1]
            assert checks[-1]["fab_hash"] == walk.announced
        procs.close()
        assert procs.alive_pids() == [], procs.alive_pids()
