"""A built-in environment that speaks the Atropos protocol over REST.

It does what an Atropos `BaseEnv` does against `run-api` and an SGLang server: register
with `/register-env` (waiting while the trainer has not started), watch `/status-env` so
it does not run far ahead of the trainer, sample a group per prompt from `/generate`,
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
import json
import logging
import os
import random
from dataclasses import dataclass, field

import httpx

from services.demo import retry
from services.demo.task import make_prompt, score

log = logging.getLogger("clotho.demo_env")


@dataclass
class DemoEnvConfig:
    gateway_url: str
    tokenizer_path: str
    group_size: int = 8
    max_new_tokens: int = 4
    temperature: float = 1.0
    concurrency: int = 4
    max_groups_ahead: int = 8
    max_token_length: int = 64
    name: str = "repeat_digit"
    seed: int = 0
    max_groups: int | None = None
    trajectory_token: str | None = field(default=None, repr=False)
    inference_token: str | None = field(default=None, repr=False)


def _bearer(token: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"} if token else {}


class DemoEnv:
    def __init__(self, config: DemoEnvConfig) -> None:
        from transformers import AutoTokenizer

        self.config = config
        self.tokenizer = AutoTokenizer.from_pretrained(config.tokenizer_path)
        self.rng = random.Random(config.seed)
        self.env_id: int | None = None
        self.sent = 0
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
            "max_token_length": self.config.max_token_length,
            "desired_name": self.config.name,
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

    async def _room(self, client: httpx.AsyncClient) -> bool:
        r = await self._call(client, "GET", "/status-env", json={"env_id": self.env_id}, headers=self._trajectory)
        return int(r.json().get("self_queue_size", 0)) < self.config.max_groups_ahead

    async def one_group(self, client: httpx.AsyncClient) -> float:
        prompt = make_prompt(self.rng)
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
            headers=self._inference,
        )
        outs = r.json()
        outs = outs if isinstance(outs, list) else [outs]
        tokens, masks, scores, logprobs = [], [], [], []
        for out in outs:
            triples = out["meta_info"]["output_token_logprobs"]
            out_ids = [int(t[1]) for t in triples]
            text = self.tokenizer.decode(out_ids, skip_special_tokens=True)
            tokens.append(prompt_ids + out_ids)
            masks.append([-100] * len(prompt_ids) + out_ids)
            logprobs.append([1.0] * len(prompt_ids) + [float(t[0]) for t in triples])
            scores.append(score(text, prompt.digit, self.config.max_new_tokens))
        r = await self._call(
            client,
            "POST",
            "/scored_data",
            json={
                "tokens": tokens,
                "masks": masks,
                "scores": scores,
                "inference_logprobs": logprobs,
                "env_id": self.env_id,
            },
            headers=self._trajectory,
        )
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
            sem = asyncio.Semaphore(self.config.concurrency)

            async def worker() -> None:
                while not stop.is_set():
                    if self.config.max_groups is not None and self.sent >= self.config.max_groups:
                        return
                    async with sem:
                        if not await self._room(client):
                            # The trainer is behind: do not produce stale data.
                            await asyncio.sleep(0.05)
                            continue
                        await self.one_group(client)

            try:
                await asyncio.gather(*(worker() for _ in range(self.config.concurrency)))
            except retry.Stopped:
                pass


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="clotho demo-env", description=__doc__.splitlines()[0])
    p.add_argument("--gateway-url", default="http://127.0.0.1:8000")
    p.add_argument("--tokenizer-path", required=True)
    p.add_argument("--group-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=4)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--max-groups-ahead", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-groups", type=int, default=None)
    args = p.parse_args(argv)
    logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request drowns the log
    config = DemoEnvConfig(
        **vars(args),
        trajectory_token=os.environ.get("CLOTHO_DEMO_TRAJECTORY_TOKEN") or None,
        inference_token=os.environ.get("CLOTHO_DEMO_INFERENCE_TOKEN") or None,
    )
    env = DemoEnv(config)
    print(json.dumps({"event": "ready"}), flush=True)
    try:
        asyncio.run(env.run())
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
