"""A real `atroposlib` environment against a real gateway and inference service.

The environment below is a small `BaseEnv` subclass on local prompts with the tiny
local tokenizer. It runs as its own process in Atropos' `serve` mode (this file is its
entry point: `python test_atropos_env.py serve --env.* --openai.*`), exactly as users
run theirs, with its `rollout_server_url` and its `APIServerConfig.base_url` both on
the gateway:

- server_type "sglang": rollouts through `ManagedServer.chat_completion`, which sends
  SGLang's native `/generate` with input_ids and reads the token logprobs (its health
  check polls `/v1/completions`);
- server_type "openai": rollouts through the OpenAI client's
  `/v1/chat/completions` with n and logprobs (its health check polls that route too);
- server_type "vllm": rollouts through `ManagedServer.chat_completion` too, as Atropos'
  example GRPO trainer's users run them: its `VLLMServer` sends vLLM's `/generate`
  body (`{"prompt": {"prompt_token_ids": [...]}, "logprobs": 0, ...}`) and reads the
  per-token `[{"<id>": logprob}]` lists (its health check polls `/health`).

A fourth environment ("openai-per-item") implements only `collect_trajectory` and lets
BaseEnv's default `collect_trajectories` build the group, as many Atropos environments
do: that group carries `advantages`, `ref_logprobs`, `messages`, `overrides` and
`images` as empty lists and no inference logprobs, which run-api accepts and so must
the gateway.

All send the `api_key` as a bearer token, which the gateway requires on inference
routes. The four environments run at once against one gateway; the
groups of all must come out of `GatewayService.StreamBatches`, read with
`clotho.client.GatewayClient`, with the prompt masked and the sampled tokens'
logprobs equal to the model's own. Nothing leaves loopback: wandb is disabled and
Hugging Face runs offline.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import AsyncGenerator
from pathlib import Path

import pytest

PROMPTS = ["add 2 and 3", "say hi", "spell cat", "count to 4", "repeat ab", "name a color"]
GROUP_SIZE = 2
# Environment kinds: the server type, or "openai-per-item" (server type openai, the
# group built by BaseEnv's default collect_trajectories).
SERVER_TYPES = ("sglang", "openai", "vllm", "openai-per-item")
PER_ITEM = "openai-per-item"
MAX_NEW_TOKENS = 12
TOKEN = "inference-secret"
OFFLINE = {
    "WANDB_MODE": "disabled",
    "WANDB_SILENT": "true",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "DO_NOT_TRACK": "1",
    "NO_PROXY": "127.0.0.1,localhost",
}


def build_env_class():
    """The environment (atroposlib is imported only in the environment's process)."""
    from atroposlib.envs.base import APIServerConfig, BaseEnv, BaseEnvConfig, ScoredDataGroup, ScoredDataItem

    per_item = os.environ.get("CLOTHO_TEST_ENV_KIND") == PER_ITEM

    class TinyEnv(BaseEnv):
        name = "clotho_tiny"

        @classmethod
        def config_init(cls):
            env = BaseEnvConfig(
                group_size=GROUP_SIZE,
                use_wandb=False,
                wandb_name="clotho_tiny",
                max_token_length=MAX_NEW_TOKENS,
                total_steps=1000,
                steps_per_eval=0,
                max_num_workers=4,
                ensure_scores_are_not_same=False,
            )
            server = APIServerConfig(model_name="tiny", base_url="http://127.0.0.1:9/v1", timeout=120)
            return env, [server]

        async def setup(self):
            self.next_prompt = 0

        async def get_next_item(self):
            prompt = PROMPTS[self.next_prompt % len(PROMPTS)]
            self.next_prompt += 1
            return prompt

        async def evaluate(self, *args, **kwargs):
            return None

        def score(self, prompt: str, text: str) -> float:
            return sum(ch in prompt for ch in text) / max(len(text), 1)

        async def collect_trajectory(self, item):
            """One rollout (BaseEnv's default collect_trajectories gathers group_size)."""
            messages = [{"role": "user", "content": item}]
            completion = await self.server.chat_completion(
                messages=messages, n=1, max_tokens=MAX_NEW_TOKENS, temperature=1.0
            )
            prompt_text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            prompt_ids = self.tokenizer.encode(prompt_text, add_special_tokens=False)
            text = completion.choices[0].message.content or ""
            out_ids = self.tokenizer.encode(text, add_special_tokens=False)
            scored = ScoredDataItem(
                tokens=prompt_ids + out_ids,
                masks=[-100] * len(prompt_ids) + out_ids,
                scores=self.score(item, text),
                group_overrides={"server_type": PER_ITEM},
            )
            return scored, []

        async def collect_trajectories(self, item):
            if per_item:
                return await super().collect_trajectories(item)
            messages = [{"role": "user", "content": item}]
            sequences = []
            if self.server.servers[0].config.server_type in ("sglang", "vllm"):
                # Token ids and logprobs through ManagedServer (SGLangServer / VLLMServer).
                async with self.server.managed_server(tokenizer=self.tokenizer) as managed:
                    completion = await managed.chat_completion(
                        messages=messages, n=GROUP_SIZE, max_tokens=MAX_NEW_TOKENS, temperature=1.0
                    )
                    nodes = managed.get_state()["nodes"]
                for node, choice in zip(nodes, completion.choices):
                    sequences.append((node.tokens, node.masked_tokens, node.logprobs, choice.message.content))
            else:
                completion = await self.server.chat_completion(
                    messages=messages,
                    n=GROUP_SIZE,
                    max_tokens=MAX_NEW_TOKENS,
                    temperature=1.0,
                    logprobs=True,
                    top_logprobs=1,
                )
                prompt_text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
                prompt_ids = self.tokenizer.encode(prompt_text, add_special_tokens=False)
                for choice in completion.choices:
                    # The char-level tokenizer maps each logprob entry's token back to its id.
                    entries = choice.logprobs.content
                    out_ids = self.tokenizer.convert_tokens_to_ids([e.token for e in entries])
                    sequences.append(
                        (
                            prompt_ids + out_ids,
                            [-100] * len(prompt_ids) + out_ids,
                            [1.0] * len(prompt_ids) + [e.logprob for e in entries],
                            choice.message.content,
                        )
                    )
            server_type = self.server.servers[0].config.server_type
            group = ScoredDataGroup(
                tokens=[], masks=[], scores=[], inference_logprobs=[], group_overrides={"server_type": server_type}
            )
            for tokens, masks, logprobs, text in sequences:
                group["tokens"].append(list(tokens))
                group["masks"].append(list(masks))
                group["inference_logprobs"].append(list(logprobs))
                group["scores"].append(self.score(item, text or ""))
            return group, []

    return TinyEnv


async def start_env(kind: str, gateway_http: int, model_dir: Path, log_path: Path):
    server_type = "openai" if kind == PER_ITEM else kind
    args = [
        sys.executable,
        __file__,
        "serve",
        "--env.rollout_server_url",
        f"http://127.0.0.1:{gateway_http}",
        "--env.tokenizer_name",
        str(model_dir),
        "--openai.server_type",
        server_type,
        "--openai.base_url",
        f"http://127.0.0.1:{gateway_http}/v1",
        "--openai.api_key",
        TOKEN,
        "--openai.model_name",
        "tiny",
        "--openai.tokenizer_name",
        str(model_dir),
    ]
    with open(log_path, "wb") as log:
        return await asyncio.create_subprocess_exec(
            *args,
            stdout=log,
            stderr=log,
            env={**os.environ, **OFFLINE, "CLOTHO_TEST_ENV_KIND": kind},
            start_new_session=True,
        )


async def stop_env(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), 15)
        except TimeoutError:
            proc.kill()
            await proc.wait()


if __name__ == "__main__":
    build_env_class().cli()
    sys.exit(0)


# ---- the test ------------------------------------------------------------------------

import pytest_asyncio  # noqa: E402 - the environment process above needs none of this
import torch  # noqa: E402

from clotho.client import GatewayClient  # noqa: E402
from clotho.v1 import gateway_service_pb2 as gw  # noqa: E402

pytestmark = pytest.mark.asyncio(loop_scope="module")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def inference(tiny_model_dir, tmp_path_factory, service_process):
    args = ["--model-path", str(tiny_model_dir), "--grpc-port", "0", "--grace-seconds", "1"]
    async with service_process("services.inference", args, tmp_path_factory.mktemp("inference")) as (_, ready):
        yield f"127.0.0.1:{ready['grpc_port']}"


@pytest.fixture(scope="module")
def hf_model(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(str(tiny_model_dir))


def true_logprobs(model, tokens: list[int]) -> torch.Tensor:
    with torch.no_grad():
        logits = model(torch.tensor([tokens])).logits[0].float()
    logp = torch.log_softmax(logits[:-1], dim=-1)
    return logp.gather(-1, torch.tensor(tokens[1:]).unsqueeze(-1)).squeeze(-1)


@pytest.mark.timeout(300)
async def test_atropos_envs_sglang_openai_vllm_per_item_in_serve_mode_feed_stream_batches(
    inference, hf_model, tiny_model_dir, tmp_path, service_process
):
    """Four environment processes at once (one per server type, and one on BaseEnv's
    default per-item path) against one gateway:
    their startup (imports, Atropos' fixed 5 s pause) overlaps, and each group says
    which one sent it (group_overrides.server_type)."""
    model, tokenizer = hf_model
    templates = {
        tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
        for p in PROMPTS
    }
    args = [
        "--tokenizer-path",
        str(tiny_model_dir),
        "--http-port",
        "0",
        "--grpc-port",
        "0",
        "--inference",
        inference,
        "--inference-token",
        TOKEN,
        "--grace-seconds",
        "1",
        "--data-dir",
        str(tmp_path / "store"),
    ]
    seen: dict[str, list] = {t: [] for t in SERVER_TYPES}
    steps: list[int] = []
    async with service_process("services.gateway", args, tmp_path / "gateway") as (_, ready):
        async with GatewayClient(f"127.0.0.1:{ready['grpc_port']}") as client:
            await client.stub.RegisterTrainer(
                gw.RegisterTrainerRequest(
                    wandb_group="g", wandb_project="p", batch_size=4, max_token_len=256, num_steps=100
                )
            )
            stream = client.batches(ahead=1)
            assert isinstance(stream, AsyncGenerator)
            # The first credit is the trainer starting: the envs may register from then on.
            first = asyncio.create_task(stream.__anext__())
            envs = [
                await start_env(t, ready["http_port"], tiny_model_dir, tmp_path / f"env-{t}.log") for t in SERVER_TYPES
            ]

            async def collect() -> None:
                batch = await first
                while True:
                    steps.append(batch.step)
                    for group in batch.groups:
                        seen[group.group_overrides["server_type"]].append(group)
                    if all(len(groups) >= 2 for groups in seen.values()):
                        return
                    batch = await anext(stream)

            try:
                await asyncio.wait_for(collect(), 240)
            except BaseException:
                for t in SERVER_TYPES:
                    log = (tmp_path / f"env-{t}.log").read_text(errors="replace").splitlines()
                    print(f"---- {t} env ({len(seen[t])} groups seen) ----")
                    print("\n".join(line for line in log if "Status dict" not in line)[-4000:])
                raise
            finally:
                for env in envs:
                    await stop_env(env)
                await stream.aclose()

    assert steps == sorted(set(steps))  # every batch advanced the step
    for server_type, groups in seen.items():
        completions = 0
        for group in groups:
            assert group.HasField("env_id") and len(group.sequences) == GROUP_SIZE
            for seq in group.sequences:
                tokens, masks = list(seq.tokens), list(seq.masks)
                prompt_len = next((i for i, m in enumerate(masks) if m != -100), len(masks))
                # The masked prefix is the chat template's rendering of one of the prompts.
                assert tokenizer.decode(tokens[:prompt_len]) in templates, server_type
                assert masks[prompt_len:] == tokens[prompt_len:]
                assert len(tokens) - prompt_len <= MAX_NEW_TOKENS
                if server_type == PER_ITEM:
                    # BaseEnv sent advantages, ref_logprobs, messages, overrides as []:
                    # none given, so none present for the trainer; no logprobs either.
                    assert list(seq.present_fields) == [] and not seq.inference_logprobs
                    completions += len(tokens) > prompt_len
                    continue
                lps = list(seq.inference_logprobs)
                assert len(lps) == len(tokens)
                if len(tokens) > prompt_len:
                    completions += 1
                    # The logprobs the gateway served are the model's own, token for token.
                    expected = true_logprobs(model, tokens)[prompt_len - 1 :]
                    torch.testing.assert_close(torch.tensor(lps[prompt_len:]), expected, atol=1e-4, rtol=1e-4)
        assert completions > 0, server_type
    # The environments registered apart.
    env_ids = [{g.env_id for g in seen[t]} for t in SERVER_TYPES]
    assert sum(map(len, env_ids)) == len(set().union(*env_ids))
