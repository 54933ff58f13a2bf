"""Drive the real ClientApp in-process: the `Context` and `Message` a SuperNode would hand it.

context(run_config, node_config) -> Context;  message(state_dict, round, kind, **config) -> Message
(`kind` is the Flower message type: "train", "evaluate" or "train.finetune").
"""

from __future__ import annotations

import time
import tomllib
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, Metadata, RecordDict

ROOT = Path(__file__).resolve().parents[1]
DEFAULTS = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
SIMULATED = {"partition-id": 0, "num-partitions": 1}


def context(run: dict, node: dict | None = None, node_id: int = 1) -> Context:
    """The project's run config with `run` overrides; a simulated node unless `node` says.
    The model is the plain CNN unless `run` names another (the tests build its weights)."""
    return Context(
        run_id=7,
        node_id=node_id,
        node_config=dict(SIMULATED if node is None else node),
        state=RecordDict(),
        run_config={**DEFAULTS, "model": "cnn", **run},
    )


def message(
    state_dict: dict, round_: int, kind: str = "train", run_uid: str = "test-run", **config
) -> Message:
    content = RecordDict(
        {
            "arrays": ArrayRecord(state_dict),
            "config": ConfigRecord(
                {"server-round": round_, "run-uid": run_uid, "run-name": "opts", **config}
            ),
        }
    )
    metadata = Metadata(
        run_id=7,
        message_id=f"m{round_}-{kind}",
        src_node_id=0,
        dst_node_id=1,
        reply_to_message_id="",
        group_id=str(round_),
        created_at=time.time(),
        ttl=3600.0,
        message_type=kind,
    )
    return Message(content, metadata=metadata)


def node_status(reply: Message) -> tuple[str, str]:
    node = reply.content.config_records["node"]
    return str(node["status"]), str(node["reason"])
