"""A built-in environment that speaks the Atropos protocol over REST.

It does what an Atropos `BaseEnv` does against `run-api` and an SGLang server: register
with `/register-env` (waiting while the trainer has not started), watch `/status-env` so
it does not run far ahead of the trainer (`Room`), sample a group per prompt from `/generate`,
score it, and post the group to `/scored_data` with masks and inference logprobs aligned
with the tokens (prompt positions: mask -100, logprob 1.0). A gateway's bearer tokens
come from CLOTHO_DEMO_TRAJECTORY_TOKEN and CLOTHO_DEMO_INFERENCE_TOKEN (`clotho up`
sets them). Like an Atropos environment it rides out outages: 429/5xx answers and lost
connections are retried with backoff (retry.py), so the mesh heals after a gateway or
inference restart.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import random
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import cast

import httpx
from opentelemetry import trace

from services.common.telemetry import flush_on_sigterm, inject_headers, setup_tracing, shutdown_tracing
from services.demo import retry
from services.demo.task import TASKS, Task

log = logging.getLogger("clotho.demo_env")
tracer = trace.get_tracer("clotho.demo_env")


@dataclass
class DemoEnvConfig:
    gateway_url: str
    tokenizer_path: str
    group_size: int = 8
    max_new_tokens: int = 4
    temperature: float = 1.0
    concurrency: int = 4
    # Groups queued at the gateway or being generated, at most: max_batches_offpolicy
    # trainer batches (Atropos' BaseEnvConfig setting, batch size from /info), unless
    # max_groups_ahead is set.
    max_batches_offpolicy: int = 1
    max_groups_ahead: int | None = None
    # With a Clotho gateway: start one batch ahead and keep more (up to the limit
    # above) only while the trainer waits for data (Room). False: always the limit.
    adaptive_lead: bool = True
    # With a Clotho gateway: generate each batch only from the weights of every step that
    # took a batch before it (on-policy, as a single-process GRPO loop; one batch ahead,
    # no overlap of generation with the step). max_batches_offpolicy 0 on the command line.
    on_policy: bool = False
    max_token_length: int | None = None  # None: the task's longest sequence, at least 64
    name: str | None = None  # None: the task's name
    task: str = "repeat"
    seed: int = 0
    max_groups: int | None = None
    trajectory_token: str | None = field(default=None, repr=False)
    inference_token: str | None = field(default=None, repr=False)


def scored_data(
    prompt_ids: list[int], answers: list[dict], score: Callable[[list[int]], float], env_id: int | None
) -> dict:
    """An Atropos /scored_data body for one prompt's group from SGLang /generate answers
    (`return_logprob`): each sequence the prompt plus its completion, the prompt masked
    (-100), the engine's logprobs on the completion, `score(completion ids)` each."""
    tokens, masks, scores, logprobs = [], [], [], []
    for out in answers:
        triples = out["meta_info"]["output_token_logprobs"]
        out_ids = [int(t[1]) for t in triples]
        tokens.append(prompt_ids + out_ids)
        masks.append([-100] * len(prompt_ids) + out_ids)
        logprobs.append([1.0] * len(prompt_ids) + [float(t[0]) for t in triples])
        scores.append(score(out_ids))
    return {"tokens": tokens, "masks": masks, "scores": scores, "inference_logprobs": logprobs, "env_id": env_id}


def _bearer(token: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"} if token else {}


class DemoEnv:
    def __init__(self, config: DemoEnvConfig) -> None:
        from transformers import AutoTokenizer

        self.config = config
        self.task = Task(config.task, config.max_new_tokens)
        self.tokenizer = AutoTokenizer.from_pretrained(config.tokenizer_path)
        self.rng = random.Random(config.seed)
        self.env_id: int | None = None
        self.sent = 0
        self.batch_groups: int | None = None  # groups per trainer batch, once /info told
        self._trajectory = _bearer(config.trajectory_token)
        self._inference = _bearer(config.inference_token)
        # Set by run(): calls retried across an outage give up only when it is set.
        self._stop = asyncio.Event()

    async def _call(self, client: httpx.AsyncClient, method: str, url: str, **kwargs: object) -> httpx.Response:
        """One gateway call, retried with backoff through 429/5xx and dropped
        connections (a restarting gateway or inference service); other errors raise."""
        r = await retry.request(client, method, url, stop=self._stop, **kwargs)  # type: ignore[arg-type]
        r.raise_for_status()
        return r

    async def register(self, client: httpx.AsyncClient, stop: asyncio.Event) -> None:
        body = {
            "max_token_length": self.config.max_token_length or max(64, self.task.max_token_length()),
            "desired_name": self.config.name or ("repeat_digit" if self.task.name == "repeat" else self.task.name),
            "weight": 1.0,
            "group_size": self.config.group_size,
        }
        delay = 0.05
        while not stop.is_set():
            r = await self._call(client, "POST", "/register-env", json=body, headers=self._trajectory)
            data = r.json()
            if data.get("status") == "success":
                self.env_id = int(data["env_id"])
                log.info("registered as env %s (%s)", self.env_id, data.get("wandb_name"))
                return
            # The Atropos protocol has no push for "trainer started": retry with backoff.
            await asyncio.sleep(delay)
            delay = min(delay * 2, 1.0)

    async def groups_ahead(self, client: httpx.AsyncClient) -> int:
        """The Room's limit: `max_groups_ahead`, or as an Atropos environment sizes it,
        max_batches_offpolicy * batch_size // group_size with the trainer's batch size
        from `/info` (known once registration succeeded: it waits for the trainer). A
        gateway without it (or a batch size it does not know) leaves `concurrency`."""
        c = self.config
        if c.max_groups_ahead is not None:
            return max(1, c.max_groups_ahead)
        batch_size = 0
        with contextlib.suppress(httpx.HTTPError, ValueError, TypeError):
            r = await retry.request(client, "GET", "/info", stop=self._stop, headers=self._trajectory)
            if r.status_code == 200:
                batch_size = int(r.json().get("batch_size", 0))
        if batch_size <= 0:
            log.warning("no trainer batch size at /info: at most %d groups ahead", c.concurrency)
            return max(1, c.concurrency)
        self.batch_groups = max(1, batch_size // c.group_size)
        return max(1, max(1, c.max_batches_offpolicy) * batch_size // c.group_size)

    async def _status(self, client: httpx.AsyncClient) -> dict:
        r = await self._call(client, "GET", "/status-env", json={"env_id": self.env_id}, headers=self._trajectory)
        return r.json()

    async def _watch(
        self, client: httpx.AsyncClient, step: int, queue: int, wait: float, version: int | None = None
    ) -> dict:
        """/status-env as a long poll (a Clotho extension; run-api answers at once)."""
        params: dict[str, float | int] = {"wait": wait, "step": step, "queue": queue}
        if version is not None:
            params["version"] = version
        r = await self._call(
            client,
            "GET",
            "/status-env",
            params=params,
            json={"env_id": self.env_id},
            headers=self._trajectory,
        )
        return r.json()

    def room(self, client: httpx.AsyncClient, limit: int) -> Room:
        """The Room for `limit` groups ahead: adaptive from one trainer batch up to it
        (when the batch size is known and adaptive_lead is on), fixed otherwise."""
        c = self.config
        one_batch = self.batch_groups
        if c.on_policy:
            return Room(limit, lambda: self._status(client), lambda *a: self._watch(client, *a), on_policy=True)
        if c.max_groups_ahead is not None or not c.adaptive_lead or one_batch is None or one_batch >= limit:
            return Room(limit, lambda: self._status(client), lambda *a: self._watch(client, *a))
        return Room(
            one_batch,
            lambda: self._status(client),
            lambda *a: self._watch(client, *a),
            max_limit=limit,
            step_groups=one_batch,
        )

    async def one_group(self, client: httpx.AsyncClient) -> float:
        """One group: /generate, score, /scored_data, under one root span whose
        context both calls carry (one trace from the environment to the engine and on
        to the trainer step that uses the group)."""
        with tracer.start_as_current_span("demo_env.group", kind=trace.SpanKind.CLIENT) as span:
            mean = await self._one_group(client)
            span.set_attribute("clotho.mean_score", mean)
            return mean

    async def _one_group(self, client: httpx.AsyncClient) -> float:
        prompt = self.task.prompt(self.rng)
        prompt_ids = self.tokenizer.encode(prompt.text, add_special_tokens=False)
        r = await self._call(
            client,
            "POST",
            "/generate",
            json={
                "input_ids": prompt_ids,
                "sampling_params": {
                    "n": self.config.group_size,
                    "max_new_tokens": self.config.max_new_tokens,
                    "temperature": self.config.temperature,
                },
                "return_logprob": True,
            },
            headers=inject_headers(dict(self._inference)),
        )
        answers = r.json()

        def score(out_ids: list[int]) -> float:
            # A flat id list decodes to one string (transformers types decode as str | list[str]).
            return self.task.score(cast(str, self.tokenizer.decode(out_ids, skip_special_tokens=True)), prompt)

        body = scored_data(prompt_ids, answers if isinstance(answers, list) else [answers], score, self.env_id)
        r = await self._call(client, "POST", "/scored_data", json=body, headers=inject_headers(dict(self._trajectory)))
        scores = body["scores"]
        self.sent += 1
        return sum(scores) / len(scores)

    async def run(self, stop: asyncio.Event | None = None) -> None:
        stop = stop or asyncio.Event()
        self._stop = stop
        async with httpx.AsyncClient(base_url=self.config.gateway_url, timeout=60.0) as client:
            try:
                await self.register(client, stop)
            except retry.Stopped:
                return
            try:
                limit = await self.groups_ahead(client)
            except retry.Stopped:
                return
            room = self.room(client, limit)
            log.info("%d groups queued or generating ahead of the trainer (at most %d)", room.limit, room.max_limit)

            async def worker() -> None:
                while not stop.is_set():
                    if self.config.max_groups is not None and self.sent >= self.config.max_groups:
                        return
                    await room.acquire()
                    try:
                        await self.one_group(client)
                    finally:
                        room.posted()

            poller = asyncio.ensure_future(room.poll())
            try:
                # Enough workers to generate every group the lead allows at once.
                workers = max(self.config.concurrency, room.max_limit)
                await asyncio.gather(*(worker() for _ in range(workers)))
            except retry.Stopped:
                pass
            finally:
                poller.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await poller


class Room:
    """How many groups this environment may have ahead of the trainer: queued at the
    gateway plus being generated, at most `limit` (so the data stays fresh).

    Workers wait on a condition, not a timer: they wake as soon as the count drops.
    The gateway's queue shrinks when the trainer takes a batch, which the Atropos
    protocol does not push, so one poller asks on behalf of every worker, and only
    while some worker waits:
    - `watch` (a Clotho gateway's `/status-env?wait=`): a long poll the gateway
      answers the moment the trainer's step changes or this env's queue shrinks, so
      a batch handed out is seen with no request in between;
    - else (Atropos' run-api: the answer lacks `trainer_wait_seconds`) `status`, at a
      fraction of the trainer's observed step interval (its `current_step` changing),
      so a consumed batch is seen within a few milliseconds without a request storm.

    The lead adapts between `limit` and `max_limit` (steps of `step_groups`, one
    trainer batch) when the gateway says how long the trainer has waited for data
    (`trainer_wait_seconds`): while the trainer waits more than GROW_ABOVE of the
    time, one batch more is kept ahead (generation is the bottleneck: more groups at
    once keep the engine busier); while it waits less than SHRINK_BELOW, one batch
    less (the trainer is the bottleneck: a batch generated earlier would only be
    older). A bigger lead is a trial: it costs staleness (worse learning per step), so
    it stays only if the trainer's steps then come at least MIN_GAIN faster over
    TRIAL_STEPS steps; otherwise the lead goes back and no growth is tried for a
    back-off (BACKOFF_STEPS, doubling to MAX_BACKOFF_STEPS). A trainer can wait for
    reasons more groups at once do not cure (the hand-off's latency, an engine already
    at its throughput). Without that figure the lead is `max_limit`, as in Atropos.

    `on_policy` (a fixed lead): a room freed by a hand-out stays shut until the policy
    of the step that took the batch is committed (long polls with version=, up to
    MAX_ON_POLICY_WAIT_SECONDS in all), so every group is generated by the newest
    weights, as in a synchronous GRPO loop: the trainer then waits for the whole
    generation of each batch.
    """

    MIN_INTERVAL = 0.002
    MAX_INTERVAL = 0.05
    LONG_POLL_SECONDS = 5.0
    GROW_ABOVE = 0.10
    SHRINK_BELOW = 0.02
    SETTLE_STEPS = 4  # trainer steps observed at a lead before it may change again
    TRIAL_STEPS = 8  # steps that measure a lead's step interval (before and after growing)
    MIN_GAIN = 0.10  # a bigger lead stays if steps come this much faster (fraction)
    BACKOFF_STEPS = 32  # steps before growth is tried again after a trial that did not pay
    MAX_BACKOFF_STEPS = 1024
    MAX_COMMIT_WAIT_SECONDS = 1.0  # the longest a freed room waits for fresh weights
    MAX_ON_POLICY_WAIT_SECONDS = 60.0  # on_policy: the longest it waits for a step's weights
    # A long poll whose count went out of date is sent again after this many steps
    # (the trainer takes the next batch within about one) and at least this long.
    OUTDATED_GRACE_STEPS = 1.5
    MIN_OUTDATED_GRACE = 0.02

    def __init__(
        self,
        limit: int,
        status: Callable[[], Awaitable[dict]],
        watch: Callable[..., Awaitable[dict]] | None = None,
        *,
        max_limit: int | None = None,
        step_groups: int | None = None,
        on_policy: bool = False,
    ) -> None:
        self.limit = max(1, limit)
        self.on_policy = on_policy and watch is not None
        self._shut = False  # on_policy: a freed room waits for the step's weights
        self.min_limit = self.limit
        self.max_limit = max(self.limit, max_limit or self.limit)
        self.step_groups = max(1, step_groups or self.limit)
        self.status = status
        self.watch = watch
        self.queued = 0  # at the gateway, as last seen (plus what we posted since)
        self.generating = 0
        self.waiting = 0
        self.changed = asyncio.Condition()
        self.step: int | None = None
        self.step_seen: float | None = None
        self.step_interval: float | None = None
        self.requests = 0  # status requests sent (tests count them)
        # The trainer's waiting, as the gateway reports it: (seconds waited, when seen)
        # at the last step change, the smoothed fraction of time since, steps counted.
        self._wait_mark: tuple[float, float] | None = None
        self.wait_fraction: float | None = None
        self._wanted = self.limit
        self._settled = 0
        # (step, time) of the last steps at the current lead; a growth on trial: (the
        # lead before, its step interval, the step it grew at, when); growth held until.
        self._marks: deque[tuple[int, float]] = deque(maxlen=self.TRIAL_STEPS + 1)
        self._trial: tuple[int, float, int, float] | None = None
        self._no_growth_before = 0
        self._backoff = self.BACKOFF_STEPS

    def _free(self) -> bool:
        return not self._shut and self.queued + self.generating < self.limit

    async def acquire(self) -> None:
        async with self.changed:
            self.waiting += 1
            self.changed.notify_all()  # wakes the poller
            try:
                await self.changed.wait_for(self._free)
            finally:
                self.waiting -= 1
            self.generating += 1
            self.changed.notify_all()  # others may wait again, now at the limit

    def posted(self) -> None:
        self.generating -= 1
        self.queued += 1

    def interval(self) -> float:
        if self.step_interval is None:
            return self.MIN_INTERVAL * 5
        return min(max(self.step_interval / 8, self.MIN_INTERVAL), self.MAX_INTERVAL)

    def observe(self, status: dict, now: float) -> None:
        """A /status-env answer: the queue as the gateway sees it, the trainer's step
        (and, from a Clotho gateway, how long the trainer has waited for data)."""
        self.queued = int(status.get("self_queue_size", 0))
        step = status.get("current_step")
        if isinstance(step, int) and step != self.step:
            stepped = self.step is not None and step > self.step
            if stepped and self.step_seen is not None:
                assert self.step is not None
                seen = (now - self.step_seen) / (step - self.step)
                self.step_interval = seen if self.step_interval is None else 0.7 * self.step_interval + 0.3 * seen
            self.step, self.step_seen = step, now
            waited = status.get("trainer_wait_seconds")
            if stepped and isinstance(waited, (int, float)):
                self._adapt(float(waited), now)

    def _adapt(self, waited: float, now: float) -> None:
        """At a step change: the fraction of the time since the last one the trainer
        spent waiting for data, smoothed; the lead moves by one batch when it is
        clearly high or low for SETTLE_STEPS steps at the current lead."""
        mark, self._wait_mark = self._wait_mark, (waited, now)
        if mark is None:
            return  # the first step (the trainer's wait for the first batch) is no measure
        elapsed = now - mark[1]
        if elapsed <= 0:
            return
        fraction = min(1.0, max(0.0, (waited - mark[0]) / elapsed))
        self.wait_fraction = fraction if self.wait_fraction is None else 0.5 * self.wait_fraction + 0.5 * fraction
        if self.max_limit == self.min_limit:
            return  # a fixed lead (the fraction still decides whether to wait for weights)
        step = self.step if self.step is not None else 0
        self._marks.append((step, now))
        if self._trial is not None and self._judge_trial(step, now):
            return
        if self.wait_fraction > self.GROW_ABOVE:
            want = min(self.max_limit, self.limit + self.step_groups)
            measured = len(self._marks) > self.TRIAL_STEPS
            if want > self.limit and (step < self._no_growth_before or not measured or self._trial is not None):
                want = self.limit  # backing off, not yet measured at this lead, or on trial
        elif self.wait_fraction < self.SHRINK_BELOW:
            want = max(self.min_limit, self.limit - self.step_groups)
        else:
            want = self.limit
        # The same move wanted SETTLE_STEPS steps in a row (one slow step moves nothing).
        self._settled = self._settled + 1 if want == self._wanted else 1
        self._wanted = want
        if self._settled >= self.SETTLE_STEPS and want != self.limit:
            log.info(
                "the trainer waited %.0f%% of the time for data: %d groups ahead (was %d)",
                100 * self.wait_fraction,
                want,
                self.limit,
            )
            if want > self.limit:
                (first_step, first_time), (last_step, last_time) = self._marks[0], self._marks[-1]
                self._trial = (self.limit, (last_time - first_time) / (last_step - first_step), step, now)
            else:
                self._trial = None
            self._set_limit(want)

    def _set_limit(self, limit: int) -> None:
        self.limit = limit
        self._settled = 0
        self.wait_fraction = None
        last = self._marks[-1] if self._marks else None
        self._marks.clear()
        if last is not None:
            self._marks.append(last)

    def _judge_trial(self, step: int, now: float) -> bool:
        """A grown lead after TRIAL_STEPS steps: kept if steps came MIN_GAIN faster than
        before it grew, else undone (True) and growth held off for a back-off."""
        assert self._trial is not None
        before_limit, before, grew_step, grew_time = self._trial
        if step - grew_step < self.TRIAL_STEPS:
            return False
        self._trial = None
        after = (now - grew_time) / (step - grew_step)
        if after <= before * (1 - self.MIN_GAIN):
            self._backoff = self.BACKOFF_STEPS
            return False
        log.info(
            "%d groups ahead made steps no faster (%.1f ms vs %.1f ms): back to %d for %d steps",
            self.limit,
            1000 * after,
            1000 * before,
            before_limit,
            self._backoff,
        )
        self._set_limit(before_limit)
        self._no_growth_before = step + self._backoff
        self._backoff = min(2 * self._backoff, self.MAX_BACKOFF_STEPS)
        return True

    async def _ask_current(self) -> dict:
        """`_ask`, sent again when it went out of date: every worker's group posted since
        it was sent (none generating), the count grown past what it asked about, and
        no answer within a grace of OUTDATED_GRACE_STEPS steps. The gateway answers a
        long poll when this env's queue drops below the count sent; a count that is one
        too high (a group's POST answered after an answer that already counted it, or
        the batch holding it handed out) makes the room look full while the trainer
        waits for a group, and only a poll with the grown count is answered at once.
        Without a long poll (Atropos' run-api) or while groups are generating, it is
        `_ask`."""
        while True:
            sent = self.queued
            ask = asyncio.ensure_future(self._ask())
            outdated = asyncio.ensure_future(self._outdated(sent))
            try:
                await asyncio.wait({ask, outdated}, return_when=asyncio.FIRST_COMPLETED)
                if not ask.done():
                    await asyncio.wait({ask}, timeout=self._outdated_grace())
                if ask.done():
                    return ask.result()
            finally:
                outdated.cancel()
                if not ask.done():
                    ask.cancel()
                    with contextlib.suppress(asyncio.CancelledError, httpx.HTTPError):
                        await ask
            log.debug("status-env asked about %d queued groups, %d now: asking again", sent, self.queued)

    async def _outdated(self, sent: int) -> None:
        """Until no group is generating and more are queued than `sent` (a long poll only)."""
        if self.watch is None:
            await asyncio.Event().wait()  # never: run-api is polled, each answer current
        async with self.changed:
            await self.changed.wait_for(lambda: self.generating == 0 and self.queued > sent)

    def _outdated_grace(self) -> float:
        interval = self.step_interval if self.step_interval is not None else self.MAX_INTERVAL
        return min(self.LONG_POLL_SECONDS, max(self.MIN_OUTDATED_GRACE, self.OUTDATED_GRACE_STEPS * interval))

    async def _ask(self) -> dict:
        self.requests += 1
        if self.watch is None:
            return await self.status()
        try:
            status = await self.watch(-1 if self.step is None else self.step, self.queued, self.LONG_POLL_SECONDS)
        except httpx.HTTPStatusError as exc:
            if not 400 <= exc.response.status_code < 500:
                raise
            status = None  # a server that refuses the parameters: no extension either
        if status is None or "trainer_wait_seconds" not in status:
            # Atropos' run-api: it answered at once, without the extension. Poll from now
            # on, at the lead Atropos would keep.
            log.info("the gateway has no /status-env long poll: polling it, %d groups ahead", self.max_limit)
            self.watch = None
            self.limit = self.min_limit = self.max_limit
            if status is None:
                status = await self.status()
        return status

    async def poll(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            async with self.changed:
                await self.changed.wait_for(lambda: self.waiting > 0 and not self._free())
            try:
                status = await self._ask_current()
            except httpx.HTTPError as exc:
                log.warning("status-env failed: %s", exc)
                await asyncio.sleep(self.MAX_INTERVAL)
                continue
            async with self.changed:
                self.observe(status, loop.time())
                free = self._free()
                if free and self.on_policy and self.watch is not None and self._behind(status):
                    self._shut = True  # no worker starts until the weights are there
            if self._shut:
                try:
                    await self._await_step_weights(status, loop)
                finally:
                    async with self.changed:
                        self._shut = False
                        free = self._free()
            elif free and self._stale_weights(status):
                await self._await_commit(status, loop)
            if free:
                async with self.changed:
                    self.changed.notify_all()
                continue
            if self.watch is None:
                await asyncio.sleep(self.interval())

    def _stale_weights(self, status: dict) -> bool:
        """Room freed (the trainer took a batch) while the trainer is the bottleneck and
        the weights of its last step are not committed yet. Generating now would sample
        from the policy before them: a version older for nothing, since the trainer has
        its batch and trains for a while yet. (When the trainer waits for data, nothing
        is held: generation is the bottleneck.)"""
        version = status.get("policy_version")
        if self.watch is None or not isinstance(version, int) or self.step is None:
            return False
        if self.wait_fraction is None or self.wait_fraction >= self.SHRINK_BELOW or self.limit != self.min_limit:
            return False
        # The trainer took the batch of step `current_step`; the weights of the step
        # before it are version current_step - 1 (one version per step).
        return version < self.step - 1

    def _behind(self, status: dict) -> bool:
        """on_policy: the committed policy is older than that of the step which took the
        last batch (the gateway's step counts the batches handed out; step S's weights
        are version S)."""
        version = status.get("policy_version")
        return isinstance(version, int) and self.step is not None and version < self.step

    async def _await_step_weights(self, status: dict, loop: asyncio.AbstractEventLoop) -> None:
        """on_policy: long polls (version=) until the committed policy is the step's."""
        assert self.watch is not None
        deadline = loop.time() + self.MAX_ON_POLICY_WAIT_SECONDS
        while self._behind(status) and (left := deadline - loop.time()) > 0:
            assert self.step is not None
            self.requests += 1
            try:
                status = await self.watch(
                    self.step, self.queued, min(left, self.LONG_POLL_SECONDS), int(status["policy_version"])
                )
            except httpx.HTTPError as exc:
                log.warning("status-env failed: %s", exc)
                await asyncio.sleep(self.MAX_INTERVAL)
                continue
            async with self.changed:
                self.observe(status, loop.time())

    async def _await_commit(self, status: dict, loop: asyncio.AbstractEventLoop) -> None:
        """Wait (a long poll, at most a quarter of a step) for a newer committed policy."""
        assert self.watch is not None and self.step is not None
        wait = min(self.MAX_COMMIT_WAIT_SECONDS, (self.step_interval or 0.0) / 4)
        if wait <= 0:
            return
        self.requests += 1
        with contextlib.suppress(httpx.HTTPError):
            answer = await self.watch(self.step, self.queued, wait, int(status["policy_version"]))
            async with self.changed:
                self.observe(answer, loop.time())


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="clotho demo-env", description=__doc__.splitlines()[0])
    p.add_argument("--gateway-url", default="http://127.0.0.1:8000")
    p.add_argument("--tokenizer-path", required=True)
    p.add_argument("--task", choices=TASKS, default="repeat", help="repeat a digit, or reverse a digit string")
    p.add_argument("--group-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=4)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument(
        "--max-batches-offpolicy",
        type=int,
        default=1,
        help="trainer batches queued at the gateway or being generated, at most (Atropos' "
        "max_batches_offpolicy; the batch size comes from the gateway's /info); 0: one batch, "
        "generated only from the weights of the step that took the batch before it (on-policy)",
    )
    p.add_argument(
        "--max-groups-ahead",
        type=int,
        default=None,
        help="groups queued at the gateway or being generated, at most (overrides --max-batches-offpolicy)",
    )
    p.add_argument(
        "--adaptive-lead",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="with a Clotho gateway: keep one batch ahead, more (up to --max-batches-offpolicy) "
        "only while the gateway reports the trainer waiting for data; --no-adaptive-lead: "
        "always --max-batches-offpolicy",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-groups", type=int, default=None)
    args = p.parse_args(argv)
    logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request drowns the log
    config = DemoEnvConfig(
        **vars(args),
        on_policy=args.max_batches_offpolicy == 0,
        trajectory_token=os.environ.get("CLOTHO_DEMO_TRAJECTORY_TOKEN") or None,
        inference_token=os.environ.get("CLOTHO_DEMO_INFERENCE_TOKEN") or None,
    )
    setup_tracing("clotho-demo-env")
    # Killed with SIGTERM (clotho up stops it so): the spans of its last groups leave first.
    flush_on_sigterm()
    env = DemoEnv(config)
    print(json.dumps({"event": "ready"}), flush=True)
    try:
        asyncio.run(env.run())
    except KeyboardInterrupt:
        pass
    finally:
        shutdown_tracing()


if __name__ == "__main__":
    main()
