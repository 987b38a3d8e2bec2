"""The one mapping between the trajectory state's records and the store's rows.

The state (state.py and its parts) speaks in records: a `TrainerRegistration`, an
`EnvRecord`, a `Group`, a formation of batches. The store (store.py) speaks in rows
and bytes. `Journal` turns each change of a record into the store operation that
records it, and `load` turns what the store held back into records, so the encoding
(orjson for registrations, environments, versions and formations; `GroupRow` for
groups; packed int64 ids for kept batches; the meta keys) is written here and nowhere else.

Every method appends without waiting; `sync()` resolves once everything appended
before it is durable. The state's mutators append; what acknowledges a change awaits
`sync()` (durable.py does both in one call).
"""

from __future__ import annotations

import dataclasses
from array import array
from dataclasses import dataclass, field
from typing import Any

import orjson

from services.gateway.trajectory.queue_index import Group
from services.gateway.trajectory.records import EnvRecord, TrainerRegistration
from services.gateway.trajectory.store import GroupRow, Store

# The keys of the store's `meta` table.
TRAINER = "trainer"
STEP = "step"
STARTED = "started"
POLICY_VERSION = "policy_version"
MAX_TOKEN_LEN_AFTER_RESET = "max_token_len_after_reset"
LATEST = "latest"
CHECKPOINTED_STEP = "checkpointed_step"


@dataclass
class Restored:
    """What the store held, as records (`Journal.load`)."""

    trainer: TrainerRegistration | None = None
    step: int = 0
    started: bool = False
    policy_version: int = 0
    max_token_len_after_reset: int = -1
    envs: list[EnvRecord] = field(default_factory=list)
    # Every group held, by id (ascending: each buffer's order).
    groups: dict[int, Group] = field(default_factory=dict)
    # The formations /batch kept, oldest first: (formation, its batches' group ids).
    formations: list[tuple[int, list[list[int]]]] = field(default_factory=list)
    # The latest example /reset_data kept, if any.
    latest: bytes | None = None
    # Served completions' versions, oldest first: (key, version).
    receipts: list[tuple[int, int]] = field(default_factory=list)
    # Batches kept for an acknowledging trainer, by step: (step, group ids).
    kept: list[tuple[int, list[int]]] = field(default_factory=list)
    # The newest step a trainer checkpoint was reported to hold.
    checkpointed_step: int = 0


class Journal:
    """The state's changes, as store operations."""

    def __init__(self, store: Store) -> None:
        self.store = store

    @property
    def durable(self) -> bool:
        return self.store.durable

    def check(self) -> None:
        """Raise if changes can no longer be made durable (call before mutating)."""
        self.store.check()

    async def sync(self) -> None:
        """Return once every change appended so far is durable."""
        await self.store.sync()

    # -- registration ------------------------------------------------------------

    def trainer(self, registration: TrainerRegistration | None) -> None:
        self._meta(TRAINER, dataclasses.asdict(registration) if registration is not None else None)

    def step(self, step: int) -> None:
        self._meta(STEP, step)

    def started(self, started: bool) -> None:
        self._meta(STARTED, started)

    def policy_version(self, version: int) -> None:
        self._meta(POLICY_VERSION, version)

    def env(self, env: EnvRecord) -> None:
        self.store.put_env(env.registered_id, orjson.dumps(dataclasses.asdict(env)))

    # -- groups and batches ------------------------------------------------------

    def groups_added(self, groups: list[Group]) -> None:
        """New groups, queued (qpos set) or buffered (qpos -1)."""
        self.store.insert_groups([_row(g) for g in groups])

    def groups_queued(self, groups: list[Group]) -> None:
        """Buffered groups entered the queue (their qpos is set now)."""
        self.store.enqueue_groups([(g.qpos, g.id) for g in groups])

    def batches_formed(self, formation: int, batches: list[list[Group]]) -> None:
        """Batches one /batch call formed and keeps for later calls (one row for the
        whole formation, whatever its size)."""
        self.store.form_batches(formation, orjson.dumps([[g.id for g in b] for b in batches]))

    def groups_removed(self, groups: list[Group], last_of_formation: int | None = None) -> None:
        """Groups handed out or dropped; `last_of_formation` when they were the last
        batch kept from that formation."""
        self.store.delete_groups([g.id for g in groups], last_of_formation)

    def batch_kept(self, step: int, batch: list[Group]) -> None:
        """A batch handed out to an acknowledging trainer, kept under its step."""
        self.store.keep_batch(step, [g.id for g in batch])

    def batches_released(self, steps: list[int], groups: list[Group], checkpointed_step: int) -> None:
        """Kept batches forgotten (a checkpoint holds them, or they passed the bound)."""
        self.store.release_batches(steps, [g.id for g in groups])
        self._meta(CHECKPOINTED_STEP, checkpointed_step)

    def receipt(self, key: int, version: int) -> None:
        """A served completion's version (receipts.py's sink); never waited for."""
        self.store.put_receipt(key, version)

    # -- reset -------------------------------------------------------------------

    def reset(self, max_token_len_after_reset: int, latest: bytes | None) -> None:
        """Forget groups, batches and environments; the meta left is what /reset_data
        keeps (the latest example, the old max_token_len /info shows)."""
        self.store.reset()
        self.trainer(None)
        self.step(0)
        self.started(False)
        self._meta(CHECKPOINTED_STEP, 0)
        self._meta(MAX_TOKEN_LEN_AFTER_RESET, max_token_len_after_reset)
        if latest is not None:
            self.store.put_meta(LATEST, latest)

    # -- startup -----------------------------------------------------------------

    def load(self) -> Restored:
        """What the store held, decoded."""
        snapshot = self.store.load()
        meta = {key: orjson.loads(value) for key, value in snapshot.meta.items() if key != LATEST}
        kept = snapshot.meta.get(LATEST)
        return Restored(
            trainer=TrainerRegistration(**meta[TRAINER]) if meta.get(TRAINER) else None,
            step=meta.get(STEP, 0),
            started=bool(meta.get(STARTED, False)),
            policy_version=meta.get(POLICY_VERSION, 0),
            max_token_len_after_reset=meta.get(MAX_TOKEN_LEN_AFTER_RESET, -1),
            envs=[EnvRecord(**orjson.loads(record)) for _, record in snapshot.envs],
            groups={row[0]: _group(row) for row in snapshot.groups},
            formations=[(formation, orjson.loads(batches)) for formation, batches in snapshot.ready],
            latest=bytes(kept) if kept else None,
            receipts=snapshot.receipts,
            kept=[(step, list(array("q", ids))) for step, ids in snapshot.kept],
            checkpointed_step=meta.get(CHECKPOINTED_STEP, 0),
        )

    def _meta(self, key: str, value: Any) -> None:
        self.store.put_meta(key, orjson.dumps(value))


def _row(group: Group) -> GroupRow:
    return (
        group.id,
        group.qpos if group.qpos >= 0 else None,
        group.env_id,
        group.size,
        orjson.dumps(group.versions),
        group.body,
    )


def _group(row: GroupRow) -> Group:
    gid, qpos, env_id, size, versions, body = row
    return Group(
        id=gid,
        size=size,
        env_id=env_id,
        body=bytes(body),
        versions=tuple(orjson.loads(versions)),
        qpos=-1 if qpos is None else qpos,
    )
