"""Shared fixtures: a private FEDVOX_HOME, the node's training loop with test-sized defaults."""

from __future__ import annotations

import os

import pytest

from client.train import LocalTraining, TrainResult, local_sgd


@pytest.fixture(scope="session", autouse=True)
def fedvox_home(tmp_path_factory):
    """Tests never touch a user's ~/.fedvox (data, runs, simulated nodes' ledgers); Flower
    processes the tests start inherit it."""
    home = tmp_path_factory.mktemp("fedvox-home")
    before = os.environ.get("FEDVOX_HOME")
    os.environ["FEDVOX_HOME"] = str(home)
    yield home
    if before is None:
        os.environ.pop("FEDVOX_HOME", None)
    else:
        os.environ["FEDVOX_HOME"] = before


@pytest.fixture
def sgd():
    """`sgd(model, images, labels, noise_multiplier=1.0, **settings)`: one call of the node's
    training loop (`client.train.local_sgd`); settings default to 1 epoch, batch 8, lr 0.1."""

    def run(model, images, labels, *, noise_multiplier=1.0, loss_fn=None, **settings):
        base = {"epochs": 1, "batch_size": 8, "learning_rate": 0.1}
        settings = LocalTraining(**{**base, **settings})
        return local_sgd(model, images, labels, settings, noise_multiplier, loss_fn)

    return run


__all__ = ["TrainResult", "sgd"]
