"""The demo environment's Room: groups ahead of the trainer, without timed sleeps."""

import asyncio
import contextlib

import pytest

from services.demo.env import Room
from waiting import wait_until


async def test_room_blocks_at_the_limit_and_wakes_when_the_trainer_consumes() -> None:
    gateway = {"self_queue_size": 0, "current_step": 0}
    asked = 0

    async def status() -> dict:
        nonlocal asked
        asked += 1
        return dict(gateway)

    room = Room(2, status)
    poller = asyncio.ensure_future(room.poll())
    try:
        await asyncio.wait_for(room.acquire(), 1)
        await asyncio.wait_for(room.acquire(), 1)
        assert asked == 0  # room to spare: nobody asks the gateway
        room.posted()
        room.posted()
        gateway["self_queue_size"] = 2
        third = asyncio.ensure_future(room.acquire())
        await asyncio.sleep(0.05)
        assert not third.done() and asked >= 1  # at the limit: waits, the poller asks
        gateway.update(self_queue_size=0, current_step=1)  # the trainer took a batch
        await asyncio.wait_for(third, 1)
        assert room.generating == 1 and room.queued == 0
    finally:
        poller.cancel()


async def test_room_polls_at_a_fraction_of_the_step_interval() -> None:
    async def status() -> dict:
        return {}

    room = Room(4, status)
    assert Room.MIN_INTERVAL <= room.interval() <= Room.MAX_INTERVAL
    room.observe({"self_queue_size": 4, "current_step": 10}, now=0.0)
    room.observe({"self_queue_size": 4, "current_step": 12}, now=0.16)  # 80 ms a step
    assert room.interval() == 0.01
    assert room.queued == 4
    room.observe({"self_queue_size": 0, "current_step": 13}, now=10.0)  # a long pause
    assert room.interval() == Room.MAX_INTERVAL


async def test_groups_ahead_is_sized_from_the_trainers_batch_as_atropos_does(tokenizer_dir) -> None:
    """max_batches_offpolicy * batch_size // group_size (batch size from /info);
    max_groups_ahead overrides it; a gateway without /info leaves `concurrency`."""
    import httpx

    from services.demo.env import DemoEnv, DemoEnvConfig

    info: dict = {"batch_size": 32, "max_token_len": 64}

    def answer(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/info" and info:
            return httpx.Response(200, json=info)
        return httpx.Response(404, json={})

    async def ahead(**config) -> int:
        env = DemoEnv(DemoEnvConfig(gateway_url="http://gw", tokenizer_path=tokenizer_dir, group_size=8, **config))
        async with httpx.AsyncClient(transport=httpx.MockTransport(answer), base_url="http://gw") as client:
            return await env.groups_ahead(client)

    assert await ahead() == 4  # one batch of 4 groups of 8
    assert await ahead(max_batches_offpolicy=2) == 8
    assert await ahead(max_groups_ahead=3) == 3
    info["batch_size"] = 4  # smaller than a group: still one group at a time
    assert await ahead() == 1
    info.clear()
    assert await ahead(concurrency=3) == 3


def _trainer_waiting(room: Room, fraction: float, steps: int, step_seconds: float = 0.1) -> None:
    """`steps` trainer steps of `step_seconds`, each spent `fraction` waiting for data."""
    now = room.step_seen or 0.0
    step = room.step or 0
    waited = room._wait_mark[0] if room._wait_mark else 0.0
    for _ in range(steps):
        now += step_seconds
        step += 1
        waited += fraction * step_seconds
        room.observe({"self_queue_size": 0, "current_step": step, "trainer_wait_seconds": waited}, now=now)


def _adaptive_room() -> Room:
    async def status() -> dict:
        return {}

    room = Room(4, status, max_limit=12, step_groups=4)
    # The first step's wait (the first batch: model loading, a cold start) is no measure.
    room.observe({"self_queue_size": 0, "current_step": 0, "trainer_wait_seconds": 0.0}, now=0.0)
    room.observe({"self_queue_size": 0, "current_step": 1, "trainer_wait_seconds": 30.0}, now=31.0)
    return room


async def test_the_lead_grows_while_the_trainer_waits_and_shrinks_once_it_does_not() -> None:
    room = _adaptive_room()
    _trainer_waiting(room, 0.001, Room.SETTLE_STEPS * 3)  # trainer-bound (the heavy size)
    assert room.limit == 4
    _trainer_waiting(room, 0.5, Room.SETTLE_STEPS - 1)  # generation-bound (the tiny size)
    assert room.limit == 4  # not before SETTLE_STEPS steps
    _trainer_waiting(room, 0.5, 1)
    assert room.limit == 8
    # Two batches ahead make steps faster (0.1 -> 0.07 s): the growth stays, and the next.
    _trainer_waiting(room, 0.35, Room.TRIAL_STEPS + 1, step_seconds=0.07)
    assert room.limit == 8
    _trainer_waiting(room, 0.35, Room.SETTLE_STEPS, step_seconds=0.07)
    assert room.limit == 12  # the cap
    _trainer_waiting(room, 0.15, Room.TRIAL_STEPS * 2, step_seconds=0.05)
    assert room.limit == 12
    _trainer_waiting(room, 0.05, Room.SETTLE_STEPS * 3, step_seconds=0.05)  # in between: stays
    assert room.limit == 12
    _trainer_waiting(room, 0.0, Room.SETTLE_STEPS * 3, step_seconds=0.05)
    assert room.limit == 4  # back to one batch ahead, one batch at a time


async def test_a_bigger_lead_that_makes_no_step_faster_is_undone_and_backed_off() -> None:
    # The trainer waits (a third of each step) but more groups at once do not make
    # steps faster: the grown lead is undone after its trial and growth is held off,
    # each time twice as long.
    room = _adaptive_room()
    _trainer_waiting(room, 0.33, Room.TRIAL_STEPS + Room.SETTLE_STEPS)
    assert room.limit == 8
    _trainer_waiting(room, 0.33, Room.TRIAL_STEPS - 1)
    assert room.limit == 8  # on trial
    _trainer_waiting(room, 0.33, 1)
    assert room.limit == 4  # steps were no faster: undone
    _trainer_waiting(room, 0.33, Room.BACKOFF_STEPS - 1)
    assert room.limit == 4  # held off
    _trainer_waiting(room, 0.33, Room.SETTLE_STEPS + 1)
    assert room.limit == 8  # tried again after the back-off
    _trainer_waiting(room, 0.33, Room.TRIAL_STEPS)
    assert room.limit == 4
    _trainer_waiting(room, 0.33, Room.BACKOFF_STEPS + Room.SETTLE_STEPS)
    assert room.limit == 4  # the second back-off is twice as long
    _trainer_waiting(room, 0.33, Room.BACKOFF_STEPS + 1)
    assert room.limit == 8


async def test_a_fixed_room_ignores_the_trainers_waiting() -> None:
    async def status() -> dict:
        return {}

    room = Room(8, status)
    room.observe({"self_queue_size": 0, "current_step": 0, "trainer_wait_seconds": 0.0}, now=0.0)
    _trainer_waiting(room, 0.9, Room.SETTLE_STEPS * 3)
    assert room.limit == 8
    _trainer_waiting(room, 0.0, Room.SETTLE_STEPS * 3)
    assert room.limit == 8


async def _freed_room(wait_fraction: float, max_limit: int = 8) -> tuple[Room, list[tuple], list[str]]:
    """A room at its limit whose long poll reports the trainer taking a batch before
    the weights of its last step are committed; returns the watch calls and events."""
    calls: list[tuple] = []
    events: list[str] = []

    async def status() -> dict:
        return {}

    async def watch(step: int, queue: int, wait: float, version: int | None = None) -> dict:
        calls.append((step, queue, version))
        assert room._wait_mark is not None
        answer = {"self_queue_size": 0, "current_step": 31, "trainer_wait_seconds": room._wait_mark[0]}
        if version is None:
            events.append("handed out")
            return {**answer, "policy_version": 29}  # step 30's weights still in flight
        await asyncio.sleep(0.01)
        events.append("committed")
        return {**answer, "policy_version": 30}

    room = Room(4, status, watch, max_limit=max_limit, step_groups=4)
    room.observe({"self_queue_size": 4, "current_step": 0, "trainer_wait_seconds": 0.0}, now=0.0)
    _trainer_waiting(room, wait_fraction, 30)
    room.queued = 4  # at the limit: a worker waits
    poller = asyncio.ensure_future(room.poll())
    try:
        await asyncio.wait_for(room.acquire(), 5)
        events.append("generating")
    finally:
        poller.cancel()
    return room, calls, events


@pytest.mark.parametrize("max_limit", [8, 4], ids=["adaptive", "fixed"])
async def test_a_trainer_bound_room_waits_for_the_last_steps_weights_before_generating(max_limit: int) -> None:
    room, calls, events = await _freed_room(wait_fraction=0.001, max_limit=max_limit)
    assert events == ["handed out", "committed", "generating"]
    assert calls[-1][2] == 29  # answered once a policy newer than 29 is committed


async def test_a_generation_bound_room_generates_at_once() -> None:
    room, calls, events = await _freed_room(wait_fraction=0.5)
    assert events[-2:] == ["handed out", "generating"]
    assert all(version is None for _, _, version in calls)


@pytest.mark.parametrize("wait_fraction", [0.5, 0.001], ids=["generation-bound", "trainer-bound"])
async def test_an_on_policy_room_generates_only_from_the_weights_of_the_step_that_took_the_batch(
    wait_fraction: float,
) -> None:
    """The trainer takes the batch of step 31 while step 30's weights are in flight:
    an on-policy room stays shut through the commit of 30 (still one step behind) and
    opens at 31's, however the trainer waits; a worker's own wake-up does not open it."""
    calls: list[tuple] = []
    events: list[str] = []
    committed = iter([30, 31])

    async def status() -> dict:
        return {}

    async def watch(step: int, queue: int, wait: float, version: int | None = None) -> dict:
        calls.append((step, queue, version))
        answer = {"self_queue_size": 0, "current_step": 31, "trainer_wait_seconds": 0.0}
        if version is None:
            events.append("handed out")
            return {**answer, "policy_version": 29}
        await asyncio.sleep(0.01)
        v = next(committed)
        events.append(f"committed {v}")
        return {**answer, "policy_version": v}

    room = Room(4, status, watch, on_policy=True)
    room.observe({"self_queue_size": 4, "current_step": 0, "trainer_wait_seconds": 0.0}, now=0.0)
    _trainer_waiting(room, wait_fraction, 30)
    room.queued = 4  # at the limit: workers wait
    poller = asyncio.ensure_future(room.poll())
    try:
        first = asyncio.ensure_future(room.acquire())
        await asyncio.sleep(0.005)
        second = asyncio.ensure_future(room.acquire())  # its notify wakes the first
        await asyncio.wait_for(asyncio.gather(first, second), 5)
        events.append("generating")
    finally:
        poller.cancel()
    assert events == ["handed out", "committed 30", "committed 31", "generating"]
    assert [version for _, _, version in calls] == [None, 29, 30]


async def test_max_batches_offpolicy_zero_is_one_batch_on_policy(tokenizer_dir) -> None:
    import httpx

    from services.demo.env import DemoEnv, DemoEnvConfig

    def answer(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json={"batch_size": 32})

    env = DemoEnv(
        DemoEnvConfig(
            gateway_url="http://gw", tokenizer_path=tokenizer_dir, group_size=8, max_batches_offpolicy=0, on_policy=True
        )
    )
    async with httpx.AsyncClient(transport=httpx.MockTransport(answer), base_url="http://gw") as client:
        limit = await env.groups_ahead(client)
        room = env.room(client, limit)
    assert limit == 4 and room.on_policy and room.max_limit == 4


class _Gateway:
    """The gateway's long poll as far as a Room sees it: answered when the step differs
    from the one sent or this env's queue is below the count sent, else at the timeout."""

    def __init__(self) -> None:
        self.queue = 0
        self.step = 0
        self.changed = asyncio.Condition()
        self.asks: list[tuple[int, int]] = []

    async def watch(self, step: int, queue: int, wait: float, version: int | None = None) -> dict:
        self.asks.append((step, queue))
        async with self.changed:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await self.changed.wait_for(lambda: self.step != step or self.queue < queue)
            return {
                "self_queue_size": self.queue,
                "current_step": self.step,
                "trainer_wait_seconds": 0.0,
                "policy_version": self.step,
            }

    async def post(self) -> None:
        async with self.changed:
            self.queue += 1
            self.changed.notify_all()

    async def hand_out(self, groups: int) -> None:
        async with self.changed:
            self.queue -= groups
            self.step += 1
            self.changed.notify_all()


async def test_a_room_that_counted_a_group_twice_asks_again_instead_of_waiting_out_the_long_poll() -> None:
    """The batch's last group lands and is handed out before its POST is answered: the
    room counts it again (one queued too many), fills with the next batch's other three
    groups and, with a long poll sent before they were posted, would wait out its
    timeout (5 s in `clotho up`; the trainer waits for the fourth group all along).
    It asks again with the grown count, answered at once."""
    gw = _Gateway()

    async def status() -> dict:
        return {}

    room = Room(4, status, gw.watch)
    room.LONG_POLL_SECONDS = 30.0  # the stall, were it not asked again, outlasts the test
    now = asyncio.get_running_loop().time()
    room.observe({"self_queue_size": 0, "current_step": 0, "trainer_wait_seconds": 0.0}, now=now)
    poller = asyncio.ensure_future(room.poll())
    try:
        for _ in range(4):
            await room.acquire()
        for _ in range(3):
            await gw.post()
            room.posted()
        first = asyncio.ensure_future(room.acquire())  # full: the poller asks (step 0, 3 queued)
        await wait_until(lambda: len(gw.asks) == 1)
        await gw.post()  # the fourth group lands...
        await gw.hand_out(4)  # ...and the trainer takes the batch: the long poll answers
        await asyncio.wait_for(first, 5)
        room.posted()  # the fourth group's POST answered late: counted again
        assert (room.queued, room.generating) == (1, 1)
        for _ in range(2):
            await asyncio.wait_for(room.acquire(), 5)  # the room fills with 3 real groups
        await gw.post()  # one lands, its answer still on the way
        waiting = asyncio.ensure_future(room.acquire())  # the poller asks (step 1, 1 queued)
        await wait_until(lambda: len(gw.asks) == 2)
        room.posted()
        for _ in range(2):
            await gw.post()
            room.posted()
        others = [asyncio.ensure_future(room.acquire()) for _ in range(2)]  # the workers wait again
        assert gw.queue == 3 and (room.queued, room.generating) == (4, 0)
        # Asked again with 4 queued (the gateway has 3): one of the waiting workers generates.
        workers = [waiting, *others]
        done, _ = await asyncio.wait(workers, timeout=5, return_when=asyncio.FIRST_COMPLETED)
        assert len(done) == 1 and (1, 4) in gw.asks
        assert (room.queued, room.generating) == (3, 1)
        for task in workers:
            task.cancel()
    finally:
        poller.cancel()
