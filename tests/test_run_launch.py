"""What `fedvox run` hands `flwr run`: client resources that train hospitals in parallel, and
a copy of the app that Flower bundles without walking the virtual environment."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from flwr.cli.build import build_fab_from_disk

from simulations.run import with_app_copy, with_client_resources

ROOT = Path(__file__).resolve().parents[1]
FIVE = [".", "--federation-config", "num-supernodes=5"]


@pytest.fixture
def flwr_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("FLWR_HOME", str(tmp_path))
    return tmp_path


def _cpus(argv: list[str]) -> list[str]:
    return [a for a in argv if "client-resources-num-cpus" in a]


def test_local_simulation_gets_one_actor_per_core_up_to_one_per_hospital(flwr_home: Path):
    # no config.toml yet: `flwr run` makes one whose default connection is the local one
    assert _cpus(with_client_resources(FIVE, 2)) == ["client-resources-num-cpus=1"]
    assert _cpus(with_client_resources(FIVE, 16)) == ["client-resources-num-cpus=3"]
    assert _cpus(with_client_resources(["."], 16)) == ["client-resources-num-cpus=8"]
    assert _cpus(with_client_resources(["."], 1)) == ["client-resources-num-cpus=1"]
    three = [".", "--federation-config", "num-supernodes=3"]  # 3 hospitals, 2 cores: 3 actors
    assert with_client_resources(three, 2)[-1] == "client-resources-num-cpus=1 init-args-num-cpus=3"
    assert _cpus(with_client_resources(three, 4)) == ["client-resources-num-cpus=1"]
    ray = [".", "--federation-config", "num-supernodes=3 init-args-num-cpus=2"]
    assert _cpus(with_client_resources(ray, 2)) == ["client-resources-num-cpus=1"]
    own = [".", "--federation-config", "num-supernodes=5 client-resources-num-cpus=2"]
    assert with_client_resources(own, 2) == own  # the user's choice stands
    toml = [".", "--federation-config", "sim.toml"]
    assert with_client_resources(toml, 2) == toml  # Flower takes nothing beside a file


def test_a_deployed_superlink_gets_no_client_resources(flwr_home: Path):
    (flwr_home / "config.toml").write_text(
        '[superlink]\ndefault = "hospitals"\n'
        '[superlink.hospitals]\naddress = "10.0.0.1:9093"\n'
        '[superlink.local]\naddress = ":local:"\n'
    )
    assert with_client_resources(FIVE, 2) == FIVE
    assert _cpus(with_client_resources([*FIVE[:1], "local", *FIVE[1:]], 2))


def test_the_app_copy_bundles_the_same_fab_as_the_checkout(tmp_path: Path):
    argv = [str(ROOT), "--stream", "-c", 'run-name="x"']
    copied = with_app_copy(argv, tmp_path)
    assert copied == [str(tmp_path), *argv[1:]]
    assert not (tmp_path / ".venv").exists() and (tmp_path / "pyproject.toml").is_file()
    fab = hashlib.sha256(build_fab_from_disk(tmp_path)).hexdigest()
    assert fab == hashlib.sha256(build_fab_from_disk(ROOT)).hexdigest()
    assert with_app_copy(["@fedvox/app"], tmp_path / "hub") == ["@fedvox/app"]
