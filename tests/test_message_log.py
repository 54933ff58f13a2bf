"""client.message_log.message_log_mod inside a real Flower ClientApp (in-process; the
deployment round trip is in test_deployment.py)."""

from __future__ import annotations

import pytest
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.app.metadata import Metadata
from flwr.clientapp import ClientApp

from client.message_log import MESSAGE_LOG_FILE, append_record, message_log_mod, read_records


def _context(node_config: dict) -> Context:
    return Context(run_id=42, node_id=7, node_config=node_config, state=RecordDict(), run_config={})


def _message(message_type: str, server_round: int) -> Message:
    meta = Metadata(
        run_id=42,
        message_id="m1",
        src_node_id=1,
        dst_node_id=7,
        reply_to_message_id="",
        group_id="",
        created_at=0.0,
        ttl=3600.0,
        message_type=message_type,
    )
    content = RecordDict({"config": ConfigRecord({"server-round": server_round})})
    return Message(content=content, metadata=meta)


def _app(status: str, eps: float | None) -> ClientApp:
    app = ClientApp(mods=[message_log_mod])

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        if status == "crash":
            raise ValueError("bad voxel")
        metrics = {"num-examples": 0 if eps is None else 12, "refused": int(status == "refused")}
        if eps is not None:
            metrics |= {"epsilon-run": eps, "epsilon-lifetime": 2 * eps, "delta": 1e-5}
        reason = "lifetime epsilon would exceed max-epsilon" if status == "refused" else ""
        return Message(
            RecordDict(
                {
                    "metrics": MetricRecord(metrics),
                    "node": ConfigRecord({"site": "h1", "status": status, "reason": reason}),
                }
            ),
            reply_to=msg,
        )

    return app


def test_one_line_per_message_with_round_epsilon_and_refusals(tmp_path):
    ctx = _context({"state-dir": str(tmp_path), "site-name": "h1"})
    # A fab-check line as the SuperNode-side approval wrapper writes it.
    append_record(
        tmp_path / MESSAGE_LOG_FILE,
        {"action": "fab-check", "run_id": 42, "fab_hash": "ab" * 32, "status": "approved"},
    )
    reply = _app("ok", 0.5)(_message("train", 1), ctx)
    assert reply.content["metrics"]["num-examples"] == 12  # the reply passes through unchanged
    _app("refused", None)(_message("train", 2), ctx)
    with pytest.raises(ValueError, match="bad voxel"):
        _app("crash", None)(_message("train", 3), ctx)
    recs = [r for r in read_records(tmp_path / MESSAGE_LOG_FILE) if r["action"] == "train"]
    assert [(r["round"], r["status"]) for r in recs] == [(1, "ok"), (2, "refused"), (3, "error")]
    ok, refused, crashed = recs
    assert (
        ok["run_id"],
        ok["num_examples"],
        ok["epsilon_run"],
        ok["epsilon_lifetime"],
        ok["delta"],
        ok["site"],
        ok["fab_hash"],
    ) == (42, 12, 0.5, 1.0, 1e-5, "h1", "ab" * 32)
    assert "max-epsilon" in refused["reason"] and refused["epsilon_run"] is None
    assert "bad voxel" in crashed["reason"]


def test_no_state_dir_no_log_and_unwritable_log_blocks_the_reply(tmp_path):
    _app("ok", 0.5)(_message("train", 1), _context({}))  # simulation: nothing written
    assert not list(tmp_path.iterdir())
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(RuntimeError, match="audit log") as err:
        _app("ok", 0.5)(_message("train", 1), _context({"state-dir": str(blocker)}))
    # Flower sends the exception's text to the server: it must not name the node's files.
    assert str(tmp_path) not in str(err.value)
