"""The hostile ServerApp of `fedvox audit node` (simulations/audit/node.py starts it).

It follows no script: it builds Messages the way server/rounds.py does (`RoundPlan` config,
`arrays`, Flower message types) but chooses every field itself, sends them one at a time to
the one SuperNode under audit and judges each reply (simulations/audit/node_attacks.py).
What to do comes from the JSON file named by $FEDVOX_AUDIT_NODE_PLAN (the harness writes it
before each `fedvox run`; the run config itself must stay one the node can parse): the phase,
the scratch state dir to read the node's ledger from, where to write the rows.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

from common.files import atomic_write_text
from common.protocol import ARRAYS, CONFIG, NodeReply, RoundPlan, read_reply

PLAN_ENV = "FEDVOX_AUDIT_NODE_PLAN"
REPLY_TIMEOUT_S = 300.0
NODE_WAIT_S = 180.0

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    from simulations.audit.node_attacks import PHASES

    plan = json.loads(Path(os.environ[PLAN_ENV]).read_text())
    session = Session.open(grid, dict(context.run_config), plan)
    rows = PHASES[plan["phase"]](session)
    out = {"rows": rows, "texts": session.texts, "metric_keys": sorted(session.metric_keys)}
    atomic_write_text(Path(plan["rows_out"]), json.dumps(out, indent=1) + "\n")


@dataclass
class Session:
    """One hostile run: the node's id, the weights it expects, everything it answered."""

    grid: Grid
    node_id: int
    plan: dict[str, Any]
    run_config: dict[str, Any]
    recipe: dict[str, Any]
    image_size: tuple[int, ...]
    weights: dict  # a fresh model of the run's architecture (torch tensors)
    texts: list[str] = field(default_factory=list)  # every string any reply carried
    metric_keys: set[str] = field(default_factory=set)

    @classmethod
    def open(cls, grid: Grid, run_config: dict[str, Any], plan: dict[str, Any]) -> Session:
        import torch

        from common.config import RunConfig
        from common.site import default_image_size, load_site, read_spec
        from common.tasks import ModelSpec, build_task_model

        site = Path(plan["site"])
        dataset = read_spec(site)
        cfg = RunConfig.parse(run_config).resolved(dataset.task, dataset.spatial_dims)
        size = cfg.input_size or default_image_size(site)
        # The server's own copy of the site's shapes (a scratch cache, never the node's).
        data = load_site(
            site, "val", image_size=size, cache_dir=Path(plan["server_cache"]), log=lambda _m: None
        )
        spec = ModelSpec.of(data, cfg.model_options)
        torch.manual_seed(0)
        model = build_task_model(spec)
        weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
        node_id = _wait_for_node(grid)
        return cls(grid, node_id, plan, run_config, cfg.recipe_values(), spec.image_size, weights)

    # -- crafting ---------------------------------------------------------------------------
    def config(self, uid: str, server_round: int, total_rounds: int, **recipe: Any) -> ConfigRecord:
        plan = RoundPlan(
            run_name="audit-node",
            run_uid=uid,
            total_rounds=total_rounds,
            image_size=self.image_size,
            server_round=server_round,
            recipe={**self.recipe, **recipe},
        )
        return plan.record()

    def send(
        self,
        kind: str,
        uid: str,
        server_round: int = 1,
        total_rounds: int = 2,
        weights: dict | None = None,
        records: RecordDict | None = None,
        **recipe: Any,
    ) -> NodeReply:
        """One message of type `kind` to the node; its reply as the server reads it."""
        if records is None:
            records = RecordDict(
                {
                    ARRAYS: ArrayRecord(self.weights if weights is None else weights),
                    CONFIG: self.config(uid, server_round, total_rounds, **recipe),
                }
            )
        msg = Message(content=records, dst_node_id=self.node_id, message_type=kind)
        got = list(self.grid.send_and_receive([msg], timeout=REPLY_TIMEOUT_S))
        if not got:
            return NodeReply("?", "no reply", f"no reply in {REPLY_TIMEOUT_S:g} s")
        self._keep_texts(got[0])
        return read_reply(got[0], node_id=self.node_id)

    def _keep_texts(self, msg: Message) -> None:
        """Every string the reply carries (record names included): the paths row greps them."""
        if msg.has_error():
            self.texts.append(str(msg.error.reason))
            return
        for name, record in msg.content.items():
            self.texts.append(str(name))
            for key, value in record.items():
                self.texts.append(str(key))
                for item in value if isinstance(value, list) else [value]:
                    if isinstance(item, str):
                        self.texts.append(item)
        for record in msg.content.metric_records.values():
            self.metric_keys.update(record.keys())

    # -- the node's own records (scratch state dir: the harness's copy) ----------------------
    def ledger(self) -> Any:
        from client.ledger import PrivacyLedger

        return PrivacyLedger.open(Path(self.plan["state_dir"]), self.plan["policy"]["accountant"])

    def lifetime_epsilon(self) -> float:
        return self.ledger().epsilon(float(self.plan["policy"]["delta"]))


def _wait_for_node(grid: Grid) -> int:
    deadline = time.monotonic() + NODE_WAIT_S
    while time.monotonic() < deadline:
        ids = list(grid.get_node_ids())
        if ids:
            return int(ids[0])
        time.sleep(0.5)
    raise RuntimeError(f"no SuperNode connected in {NODE_WAIT_S:g} s")
