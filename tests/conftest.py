"""Shared fixtures: the node's training loop with test-sized defaults."""

from __future__ import annotations

import pytest

from client.train import LocalTraining, TrainResult, local_sgd


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
