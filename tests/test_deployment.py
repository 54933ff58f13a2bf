"""Deployment on 127.0.0.1 with real processes: SuperLink (TLS + SuperNode auth) on loopback,
nginx exposing only the Fleet API, SuperNodes, `flwr supernode register`, `flwr run`.

Every process is started through tests/procs.py and ended by PID when the test ends (pass or
fail). FLWR_HOME is a tmp dir whose config.toml holds only the connections defined here, so
`flwr` never starts its detached local SuperLink.
"""

from __future__ import annotations

import http.client
import json
import shutil
import ssl
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest
from procs import Proc, Procs, flwr_env, free_port, port_open, wait_for

from client.approval import fab_hash_of_app
from client.message_log import MESSAGE_LOG_FILE, read_records
from common import certs
from simulations.harness import units
from simulations.harness.deploy import nginx_conf

ROOT = Path(__file__).resolve().parents[1]
NGINX = shutil.which("nginx") or next(
    (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if Path(p).exists()), None
)
needs_nginx = pytest.mark.skipif(
    NGINX is None,
    reason="nginx not installed (Debian: apt-get update && apt-get install -y nginx)",
)
OPERATOR = "fedvox-deploy"  # the operator's connection: SuperLink on loopback, TLS


@dataclass
class Federation:
    root: Path
    pki: Path
    env: dict[str, str]
    procs: Procs
    superlink_port: int
    proxy_port: int | None
    superlink: Proc

    @property
    def hospital_address(self) -> str:
        """What hospitals dial: the nginx Fleet-only endpoint (or the SuperLink without nginx)."""
        return f"127.0.0.1:{self.proxy_port or self.superlink_port}"

    def node_key(self, name: str) -> Path:
        return certs.node_key(self.root / "keys", name)["private"]

    def register(self, key: Path) -> None:
        rc, out = self.procs.run(
            f"register-{key.name}",
            ["flwr", "supernode", "register", f"{key}.pub", OPERATOR],
            self.env,
            cwd=self.root,
            timeout=60,
        )
        assert rc == 0 and "registered successfully" in out, out

    def supernode(
        self,
        name: str,
        key: Path | None,
        node_config: dict[str, str],
        address: str | None = None,
        tls: bool = True,
        approved_fabs: Path | None = None,
        extra: tuple[str, ...] = (),
    ) -> Proc:
        cfg = " ".join(f'{k}="{v}"' for k, v in node_config.items())
        args = [
            "--superlink",
            address or self.hospital_address,
            "--port",
            str(free_port()),
            "--node-config",
            cfg,
            *extra,
        ]
        args += ["--root-certificates", str(self.pki / "ca.crt")] if tls else ["--insecure"]
        if key is not None:
            args += ["--auth-supernode-private-key", str(key)]
        if approved_fabs is None:  # Flower's own node: its refusals, as Flower words them
            argv = ["flower-supernode", *args]
        else:  # fedvox's node, the one the hospital unit starts (client/supernode.py)
            argv = [sys.executable, "-m", "client.supernode", "--approved-fabs", str(approved_fabs)]
            argv += ["--", *args]
        # Each hospital is its own machine: its own FLWR_HOME (installed apps live there).
        env = flwr_env(self.node_home(name))
        return self.procs.start(name, argv, env, cwd=ROOT)

    def node_home(self, name: str) -> Path:
        return self.root / f"flwr-home-{name}"

    def flwr_run(self, app: Path, overrides: str, timeout: float = 300) -> str:
        rc, out = self.procs.run(
            "flwr-run",
            ["flwr", "run", str(app), OPERATOR, "--stream", "-c", overrides],
            self.env,
            cwd=self.root,
            timeout=timeout,
        )
        assert rc == 0, out[-6000:]
        return out

    def logs(self) -> str:
        return "\n".join(f"===== {p.name}\n{p.log()[-3000:]}" for p in self.procs.procs)


@pytest.fixture
def federation(tmp_path):
    """SuperLink (TLS, --enable-supernode-auth, loopback) + nginx (if installed)."""
    pki = tmp_path / "pki"
    certs.init_ca(pki, ["127.0.0.1"])
    home = tmp_path / "flwr-home"
    home.mkdir()
    superlink_port = free_port()
    proxy_port = free_port() if NGINX else None
    (home / "config.toml").write_text(
        textwrap.dedent(f"""\
        [superlink]
        default = "{OPERATOR}"

        [superlink.{OPERATOR}]
        address = "127.0.0.1:{superlink_port}"
        root-certificates = "{pki / "ca.crt"}"

        [superlink.hospital-endpoint]
        address = "127.0.0.1:{proxy_port or superlink_port}"
        root-certificates = "{pki / "ca.crt"}"
        """)
    )
    env = flwr_env(home)
    with Procs(tmp_path / "logs") as procs:
        # The SuperLink exactly as deploy/server/fedvox-superlink.service starts it.
        argv = units.command(
            units.SUPERLINK_UNIT,
            {"--port": str(superlink_port), "--database": str(tmp_path / "superlink-state.db")},
            {"/etc/fedvox/pki/": f"{pki}/"},
        )
        superlink = procs.start("superlink", argv, env, cwd=tmp_path)
        fed = Federation(tmp_path, pki, env, procs, superlink_port, proxy_port, superlink)
        wait_for(lambda: port_open(superlink_port), 60, "SuperLink port", fed.logs)
        if NGINX:
            conf = nginx_conf(tmp_path, pki, proxy_port, superlink_port)
            procs.start(
                "nginx", [NGINX, "-p", str(conf.parent), "-c", str(conf), "-g", "daemon off;"], env
            )
            wait_for(lambda: port_open(proxy_port), 30, "nginx port", fed.logs)
        yield fed
        procs.close()
        assert procs.alive_pids() == [], f"processes left behind: {procs.alive_pids()}"


def _post(port: int, path: str, ca: Path) -> tuple[int, bytes]:
    """A raw HTTPS POST (path sent byte-for-byte, no client-side normalisation)."""
    ctx = ssl.create_default_context(cafile=str(ca))
    conn = http.client.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=10)
    try:
        conn.request("POST", path, body=b"", headers={"Content-Type": "application/protobuf"})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


# --- refusals ----------------------------------------------------------------------------


def test_unregistered_node_is_refused(federation):
    fed = federation
    key = fed.node_key("not-registered")
    node = fed.supernode(
        "sn-unregistered", key, {"state-dir": str(fed.root / "st-u")}, extra=("--max-retries", "1")
    )
    rc = wait_for(
        lambda: node.poll() is not None and [node.poll()],
        90,
        "the unregistered SuperNode to give up",
        fed.logs,
    )[0]
    # flwr_exit prints Flower's exit code; the process itself exits 1.
    assert rc != 0 and "Exit Code: 305" in node.log(), node.log()[-3000:]
    assert "Failed to activate SuperNode" in node.log() and "SuperNode ID" not in node.log()


def test_plaintext_node_against_tls_superlink_is_refused(federation):
    fed = federation
    node = fed.supernode(
        "sn-plaintext",
        None,
        {"state-dir": str(fed.root / "st-p")},
        address=f"127.0.0.1:{fed.superlink_port}",
        tls=False,
        extra=("--max-retries", "1"),
    )
    rc = wait_for(
        lambda: node.poll() is not None and [node.poll()],
        90,
        "the plaintext SuperNode to give up",
        fed.logs,
    )[0]
    assert rc != 0 and "Exit Code: 305" in node.log(), node.log()[-3000:]
    assert "SuperNode ID" not in node.log()


@needs_nginx
def test_hospital_endpoint_serves_fleet_only(federation):
    fed = federation
    ca = fed.pki / "ca.crt"
    # Control the test: on the SuperLink's own (loopback) port the Control API answers.
    status, _ = _post(fed.superlink_port, "/v1/control/list-runs", ca)
    assert status != 404
    # Through the hospital-facing endpoint: Control, Runtime, docs and path tricks are 404...
    for path in [
        "/v1/control/list-runs",
        "/v1/control/start-run",
        "/v1/control/register-node",
        "/v1/runtime/acquire-task",
        "/v1/fleet/../control/list-runs",
        "/v1/fleet/%2e%2e/control/list-runs",
        "/v1/fleet/..%2fcontrol/list-runs",
        "//v1/control/list-runs",
        "/docs",
        "/openapi.json",
    ]:
        status, body = _post(fed.proxy_port, path, ca)
        assert status == 404, (path, status, body[:200])
    # ... while Fleet routes reach the SuperLink (it answers, here: unauthenticated node).
    status, _ = _post(fed.proxy_port, "/v1/fleet/get-run", ca)
    assert status not in (404, 502), status
    # And Flower's own CLI pointed at the hospital-facing endpoint cannot list or submit runs.
    rc, out = fed.procs.run(
        "flwr-ls-via-proxy", ["flwr", "ls", "hospital-endpoint"], fed.env, cwd=fed.root, timeout=60
    )
    assert rc != 0, out


# --- node-side approval, audit, Fleet through the proxy ----------------------------------

TINY_SERVER = """
import json, time
from pathlib import Path
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    want = int(context.run_config["nodes"])
    deadline = time.time() + 60
    while len(ids := sorted(grid.get_node_ids())) < want and time.time() < deadline:
        time.sleep(0.5)
    msgs = [Message(RecordDict({"config": ConfigRecord({"server-round": 1})}),
                    dst_node_id=i, message_type="train") for i in ids]
    out = []
    for r in grid.send_and_receive(msgs, timeout=90):
        out.append({"error": r.error.reason if r.has_error() else None,
                    "metrics": None if r.has_error() else dict(r.content["metrics"])})
    Path(context.run_config["out"]).write_text(json.dumps(out))
"""

TINY_CLIENT = """
from pathlib import Path
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from client.message_log import message_log_mod

# Importing this module at all leaves a trace: an unapproved app must never get this far.
Path({marker!r}).write_text("imported")

app = ClientApp(mods=[message_log_mod])


@app.train()
def train(msg: Message, context: Context) -> Message:
    return Message(RecordDict({{
        "metrics": MetricRecord({{"num-examples": 7, "epsilon-run": 0.25,
                                 "epsilon-lifetime": 1.5, "delta": 1e-5}}),
        "node": ConfigRecord({{"site": "h1", "status": "ok", "reason": ""}}),
    }}), reply_to=msg)
"""


def _tiny_app(root: Path, name: str, marker: Path) -> Path:
    app = root / name
    (app / "tinyapp").mkdir(parents=True)
    (app / "pyproject.toml").write_text(
        textwrap.dedent(f"""\
        [build-system]
        requires = ["setuptools"]
        build-backend = "setuptools.build_meta"

        [project]
        name = "{name}"
        version = "0.1.0"

        [tool.flwr.app]
        publisher = "fedvoxtest"

        [tool.flwr.app.components]
        serverapp = "tinyapp.server:app"
        clientapp = "tinyapp.client:app"

        [tool.flwr.app.config]
        nodes = 1
        out = ""
        """)
    )
    (app / "tinyapp" / "__init__.py").write_text("")
    (app / "tinyapp" / "server.py").write_text(TINY_SERVER)
    (app / "tinyapp" / "client.py").write_text(TINY_CLIENT.format(marker=str(marker)))
    return app


def test_node_refuses_unapproved_app_before_it_runs_and_logs_it(federation):
    fed = federation
    approved = _tiny_app(fed.root, "approved-app", fed.root / "imported-approved")
    rogue = _tiny_app(fed.root, "rogue-app", fed.root / "imported-rogue")
    ok_hash, rogue_hash = fab_hash_of_app(approved), fab_hash_of_app(rogue)
    assert ok_hash != rogue_hash
    allow = fed.root / "approved-fabs.txt"
    allow.write_text(f"# fedvox release, reviewed\n{ok_hash}\n")

    state = fed.root / "state-h1"
    key = fed.node_key("h1")
    fed.register(key)
    node = fed.supernode(
        "sn-h1", key, {"state-dir": str(state), "site-name": "h1"}, approved_fabs=allow
    )  # dials nginx (Fleet only) when installed
    wait_for(
        lambda: "SuperNode ID" in node.log() or node.poll() is not None,
        60,
        "SuperNode to connect",
        fed.logs,
    )
    assert node.poll() is None, node.log()

    out = fed.root / "rogue.json"
    fed.flwr_run(rogue, f'nodes=1 out="{out}"')
    replies = json.loads(out.read_text())
    assert [r["error"] for r in replies] == ["The FAB could not be verified."], replies
    assert not (fed.root / "imported-rogue").exists(), "unapproved app code ran at the node"
    # Nothing of it was even installed at the node.
    assert not any(rogue_hash[:8] in p.name for p in fed.node_home("sn-h1").rglob("*"))
    checks = [r for r in read_records(state / MESSAGE_LOG_FILE) if r["action"] == "fab-check"]
    assert checks and all(r["status"] == "refused" for r in checks), checks
    assert checks[0]["fab_hash"] == rogue_hash and "allowlist" in checks[0]["reason"]

    out = fed.root / "approved.json"
    fed.flwr_run(approved, f'nodes=1 out="{out}"')
    replies = json.loads(out.read_text())
    assert [r["error"] for r in replies] == [None], replies
    assert replies[0]["metrics"]["num-examples"] == 7
    assert (fed.root / "imported-approved").exists()
    records = read_records(state / MESSAGE_LOG_FILE)
    approved_checks = [
        r for r in records if r["action"] == "fab-check" and r["status"] == "approved"
    ]
    assert [r["fab_hash"] for r in approved_checks] == [ok_hash]
    train = [r for r in records if r["action"] == "train"]
    assert len(train) == 1, records
    t = train[0]
    assert t["run_id"] == approved_checks[0]["run_id"] and t["fab_hash"] == ok_hash
    assert (
        t["round"],
        t["num_examples"],
        t["epsilon_run"],
        t["epsilon_lifetime"],
        t["status"],
        t["site"],
    ) == (1, 7, 0.25, 1.5, "ok", "h1")
    assert t["app"] and t["app"].endswith(ok_hash[:8])

    # A hash the hospital approves while its node runs counts from the next run: no restart.
    with allow.open("a") as f:
        f.write(f"{rogue_hash}  # approved later\n")
    out = fed.root / "rogue-approved.json"
    fed.flwr_run(rogue, f'nodes=1 out="{out}"')
    assert [r["error"] for r in json.loads(out.read_text())] == [None]
    assert node.poll() is None and (fed.root / "imported-rogue").exists()
    last = [r for r in read_records(state / MESSAGE_LOG_FILE) if r["action"] == "fab-check"][-1]
    assert (last["fab_hash"], last["status"]) == (rogue_hash, "approved")


def test_node_wrapper_rejects_unsafe_or_misplaced_arguments(tmp_path, capsys):
    from client.approval import main as approval_main
    from client.supernode import main

    allow = tmp_path / "a.txt"
    allow.write_text("0" * 64 + "\n")
    node_config = ["--node-config", f'state-dir="{tmp_path}"']
    for flower_args, said in [
        (["--allow-runtime-dependency-installation"], "--allow-runtime-dependency-installation"),
        (["--trusted-entities", "x.yaml"], "--trusted-entities"),
        (["--cold"], "put it before `--`"),  # fedvox's option, given to Flower
    ]:
        assert main(["--approved-fabs", str(allow), "--", *flower_args, *node_config]) == 2
        assert said in capsys.readouterr().err
    bad = tmp_path / "bad.txt"
    bad.write_text("not-a-hash\n")
    assert main(["--approved-fabs", str(bad), "--", *node_config]) == 2
    assert str(bad) in capsys.readouterr().err
    # The node's old second entry point says where the one entry point is.
    assert approval_main(["supernode", "--approved-fabs", str(allow), "--"]) == 2
    assert "python -m client.supernode --approved-fabs" in capsys.readouterr().err


# --- the fedvox apps, end to end -----------------------------------------------------------


def _write_sites(root: Path, sizes: dict[str, int]) -> None:
    """Small 2D NIfTI sites (nibabel, tests/nifti_factory.py): label 1 = a bright square."""
    import numpy as np
    from nifti_factory import make_site

    rng = np.random.default_rng(0)
    for name, n in sizes.items():
        cases = {}
        for k in range(n):
            label = k % 2
            img = rng.normal(0.0, 1.0, (28, 28)).astype(np.float32)
            if label:
                img[10:18, 10:18] += 3.0
            cases[f"{name}-{k:03d}"] = (img, label)
        make_site(root / name, cases, class_names=["normal", "lesion"], modality="MR")


def test_two_hospitals_two_rounds_over_tls_with_node_auth(federation):
    from client.ledger import LEDGER_FILE

    fed = federation
    data = fed.root / "data"
    _write_sites(data, {"hospital-1": 40, "hospital-2": 40, "hospital-3": 20, "holdout": 30})
    # Hospital 1 only runs the fedvox release it approved; hospital 2 runs plain Flower.
    allow = fed.root / "approved-fabs.txt"
    fedvox_hash = fab_hash_of_app(ROOT)
    allow.write_text(f"{fedvox_hash}\n")
    states = {}
    for i in (1, 2):
        site = f"hospital-{i}"
        key = fed.node_key(site)
        fed.register(key)
        states[site] = fed.root / f"state-{site}"
        node_config = {
            "data-dir": str(data / site),
            "state-dir": str(states[site]),
            "accountant": "rdp",
            "max-epsilon": "10.0",
            "delta": "1e-3",
            "max-evaluations": "2",
            "site-name": site,
        }
        fed.supernode(f"sn-{site}", key, node_config, approved_fabs=allow if i == 1 else None)
    # Hospital 3 has not written its privacy policy: it refuses, and says what is missing.
    key = fed.node_key("hospital-3")
    fed.register(key)
    unset = {"data-dir": str(data / "hospital-3"), "state-dir": str(fed.root / "state-h3")}
    fed.supernode("sn-hospital-3", key, {**unset, "site-name": "hospital-3"})

    out = fed.root / "outputs"
    fed.flwr_run(
        ROOT,
        f'num-server-rounds=2 holdout-dir="{data / "holdout"}" output-dir="{out}" '
        f'run-name="deploy" batch-size=16 min-nodes=3 target-epsilon=8.0',
        timeout=480,
    )
    summary = json.loads((out / "deploy" / "summary.json").read_text())
    rounds = {r["round"]: r for r in summary["rounds"]}
    assert {0, 1, 2} <= set(rounds), summary["rounds"]
    for rnd in (1, 2):
        hospitals = rounds[rnd]["hospitals"]
        assert set(hospitals) == {"hospital-1", "hospital-2", "hospital-3"}, hospitals
        for site in ("hospital-1", "hospital-2"):
            h = hospitals[site]
            assert h["status"] == "ok", h
            assert 0 < h["epsilon_run"] <= 8.0 and h["num_examples"] > 0, h
        refused = hospitals["hospital-3"]
        assert refused["status"] == "refused", refused
        assert "missing: accountant, max-epsilon, delta, max-evaluations" in refused["reason"]
    for site, state in states.items():
        records = read_records(state / MESSAGE_LOG_FILE)
        train = [r for r in records if r["action"] == "train"]
        assert sorted(r["round"] for r in train) == [1, 2], records
        assert all(r["status"] == "ok" and r["epsilon_run"] > 0 for r in train), train
        assert {r["action"] for r in records} >= {"train", "evaluate"}
        if site == "hospital-1":
            assert [r["fab_hash"] for r in train] == [fedvox_hash, fedvox_hash]
        ledger = json.loads((state / LEDGER_FILE).read_text())
        assert len(ledger["entries"]) >= 2, ledger


def test_superlink_refuses_node_auth_without_tls(tmp_path):
    with Procs(tmp_path / "logs") as procs:
        rc, out = procs.run(
            "superlink-insecure-auth",
            [
                "flower-superlink",
                "--insecure",
                "--enable-supernode-auth",
                "--host",
                "127.0.0.1",
                "--port",
                str(free_port()),
            ],
            flwr_env(tmp_path / "home"),
            cwd=tmp_path,
            timeout=60,
        )
    assert rc != 0 and "requires encrypted TLS" in out, out[-3000:]


def test_shipped_hospital_config_is_what_the_node_reads():
    from flwr.common.config import parse_config_args

    from client.approval import _state_dir_from_node_config, load_allowlist
    from common.config import NodePolicy

    node_toml = ROOT / "deploy" / "hospital" / "node.toml"
    cfg = parse_config_args([str(node_toml)])
    assert set(cfg) >= {"data-dir", "state-dir", "site-name"}
    assert NodePolicy.parse(cfg).missing() == []  # a complete privacy policy, as shipped
    assert _state_dir_from_node_config(str(node_toml)) == Path(cfg["state-dir"])
    assert len(load_allowlist(ROOT / "deploy" / "hospital" / "approved-fabs.txt")) == 1
