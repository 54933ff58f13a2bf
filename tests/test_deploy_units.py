"""The shipped deploy/ files against docs/deployment.md, docs/privacy.md and the code.

- every systemd unit runs one of fedvox's tested wrappers, and docs/deployment.md shows exactly
  that command: a unit or a page that drifts to another program (plain `flower-superlink`, the
  old `client.approval supernode`) or other arguments fails here;
- the units are started as real processes by tests/test_deployment.py, test_faults.py and
  test_deployment_docs.py (`simulations.harness.units.command`: their ExecStart, paths substituted);
- node.toml, docs/privacy.md's policy table and `common.config.NodePolicy` list the same keys.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import fields
from pathlib import Path

from flwr.common.config import parse_config_args

from common.config import NodePolicy
from simulations.harness import units

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs" / "deployment.md"
UNITS = sorted((ROOT / "deploy").rglob("*.service"))
WRAPPERS = {
    units.SUPERLINK_UNIT.name: ("python", "-m", "server.superlink"),
    units.SUPERNODE_UNIT.name: ("python", "-m", "client.supernode"),
}
# Any of these starting a server or a node in the docs must be a unit's command.
STARTERS = {
    ("flower-superlink",),
    ("flower-supernode",),
    ("python", "-m", "server.superlink"),
    ("python", "-m", "client.supernode"),
    ("python", "-m", "client.approval"),
}


def doc_commands(text: str) -> list[list[str]]:
    """Every command line in the page's fenced blocks (continuations joined, comments off)."""
    commands = []
    for block in re.findall(r"```[a-z]*\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            try:
                argv = shlex.split(line, comments=True)
            except ValueError:
                continue
            if argv:
                commands.append(argv)
    return commands


def _normalised(argv: list[str] | tuple[str, ...]) -> list[str]:
    return ["python" if Path(argv[0]).name.startswith("python") else argv[0], *argv[1:]]


def test_every_unit_runs_a_tested_wrapper_and_the_docs_show_exactly_it():
    assert {u.name for u in UNITS} == set(WRAPPERS), UNITS
    starts = [
        c
        for c in doc_commands(DOCS.read_text())
        if units.program_of(c) in STARTERS and c[-1:] != ["hash"] and "hash" not in c[3:4]
    ]
    for path in UNITS:
        unit = units.read_unit(path)
        assert unit.program == WRAPPERS[path.name], (path, unit.exec_start)
        assert unit.exec_start[0] == units.VENV_PYTHON and unit.user == "fedvox"
        for key in ("FLWR_TELEMETRY_ENABLED", "FLWR_DISABLE_UPDATE_CHECK"):
            assert unit.environment.get(key) in ("0", "1"), (path, key)
        assert unit.environment["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] == "1"
        documented = [c for c in starts if units.program_of(c) == unit.program]
        assert documented, f"docs/deployment.md never shows {path.name}'s command"
        for command in documented:
            assert _normalised(command) == _normalised(unit.exec_start), (path.name, command)
    # Nothing else starts a server or a node in the docs (no plain Flower, no old wrapper).
    assert {units.program_of(c) for c in starts} == set(WRAPPERS.values()), starts


def test_fedvox_options_sit_before_the_separator():
    node = units.read_unit(units.SUPERNODE_UNIT).exec_start
    i = node.index("--")
    assert "--approved-fabs" in node[:i] and "--node-config" in node[i:]
    assert units.read_unit(units.SUPERLINK_UNIT).exec_start[3] == "--"


def test_unit_substitution_keeps_the_unit_and_names_what_drifted(tmp_path):
    argv = units.command(units.SUPERLINK_UNIT, {"--port": "8123"}, {"/etc/fedvox/pki/": "/x/"})
    assert argv[1:4] == ["-m", "server.superlink", "--"] and "8123" in argv
    assert "/x/server.key" in argv and not any(a.startswith("/etc/fedvox") for a in argv)
    drifted = tmp_path / "plain.service"
    drifted.write_text(
        units.SUPERLINK_UNIT.read_text().replace(units.VENV_PYTHON + " -m server.superlink --",
                                                 "/opt/fedvox/venv/bin/flower-superlink")
    )  # fmt: skip
    try:
        units.command(drifted)
    except units.UnitError as err:
        assert "flower-superlink" in str(err)
    else:
        raise AssertionError("a unit running plain flower-superlink was accepted")


def _policy_table() -> dict[str, str]:
    text = (ROOT / "docs" / "privacy.md").read_text()
    section = text.split("## The node's privacy policy", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `([a-z-]+)` \| `?([^|`]*)`? \|", section, flags=re.M)
    return {key: value.strip('"') for key, value in rows}


def test_node_toml_the_policy_table_and_the_code_list_the_same_keys():
    shipped = parse_config_args([str(ROOT / "deploy" / "hospital" / "node.toml")])
    table = _policy_table()
    code = {f.name.replace("_", "-") for f in fields(NodePolicy)} - {
        "partition-id",  # Flower's simulation keys, never in a deployed node config
        "num-partitions",
    }
    assert set(table) == set(shipped) == code, (set(table), set(shipped), code)
    for key, value in shipped.items():  # the table's "shipped value" column is node.toml's
        if isinstance(value, bool):
            value = str(value).lower()
        said = type(value)(table[key])
        assert said == value, (key, said, value)
    assert NodePolicy.parse(shipped).missing() == [] and not NodePolicy.parse(shipped).allow_non_dp
    # One delta rule, the one the code enforces: delta < 1/N.
    node_toml = (ROOT / "deploy" / "hospital" / "node.toml").read_text()
    privacy_py = (ROOT / "common" / "privacy.py").read_text()  # the refusal's wording
    for text in (node_toml, (ROOT / "docs" / "privacy.md").read_text(), privacy_py):
        assert "below 1/N" in text and "1/(10" not in text and "1 / (10" not in text
