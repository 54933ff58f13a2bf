"""The federation benchmark's arithmetic, on a summary shaped like the server writes it."""

from __future__ import annotations

import pytest

from simulations.benchmarks.federation import _round_costs


def test_round_costs_add_every_hospitals_train_and_eval_time_and_server_eval():
    hospital = {"data_s": 0.5, "compute_s": 4.0, "eval": {"data-s": 0.1, "compute-s": 1.0}}
    summary = {
        "rounds": [
            {"round": 0, "wall_s": 9.0, "central_eval_s": 1.0, "hospitals": {}},
            {
                "round": 1,
                "wall_s": 13.0,
                "central_eval_s": 1.0,
                "hospitals": {"hospital-1": hospital, "hospital-2": dict(hospital)},
            },
            {
                "round": 2,
                "wall_s": 12.0,
                "central_eval_s": 0.5,
                "hospitals": {"hospital-1": hospital, "hospital-2": {"status": "refused"}},
            },
        ]
    }
    rows = _round_costs(summary)
    assert [r["round"] for r in rows] == [1, 2]  # round 0 is the initial evaluation only
    assert rows[0]["data_s"] == pytest.approx(1.2)
    assert rows[0]["compute_s"] == pytest.approx(2 * 5.0 + 1.0)
    assert rows[1]["compute_s"] == pytest.approx(5.0 + 0.5)  # a refusal costs nothing
