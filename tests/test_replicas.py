"""`qwen2vl serve --replicas 2`: the server's own app in front of two engine replicas on a local Ray
started here (2 CPUs, half a CPU and one torch thread per replica, the tiny checkpoint).

Answers are compared with one process's LLM (greedy, token for token); a replica is killed while
streams are running and every stream must still end with the whole answer."""

import json
import os
import re
import signal
import threading
import time
from functools import partial

import httpx
import pytest
import torch
from openai import OpenAI

from qwen2vl.engine.llm import LLM
from qwen2vl.engine.sampling_params import SamplingParams
from qwen2vl.server.limits import ServerLimits
from tests.helpers.checkpoints import tiny_checkpoint
from tests.helpers.server import MAX_MODEL_LEN, ask_all, serving

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # Ray Serve's pydantic fields
pytest.importorskip("ray", reason='the replicas need Ray: pip install -e ".[test]"')

KEY = "test-key"
KILL_MAX_TOKENS = 120
ENGINE = {"dtype": "float32", "device": "cpu", "kv_cache_gib": 0.02, "max_model_len": MAX_MODEL_LEN}


@pytest.fixture(scope="module")
def reference():
    """One process's answers over the same checkpoint, computed before Ray starts (so they don't share
    the two cores with loading replicas): what the replicas must answer. One torch thread, as each
    replica has: on a shared machine two spinning threads made this 15x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        llm = LLM(str(tiny_checkpoint()), **ENGINE)
        greedy = partial(SamplingParams, temperature=0)
        short = llm.chat([conversation(i) for i in range(8)], greedy(max_tokens=12))
        long = llm.chat([conversation(100 + i) for i in range(4)], greedy(max_tokens=KILL_MAX_TOKENS))
    finally:
        torch.set_num_threads(threads)
    return {"short": [o.text for o in short], "long": [o.text for o in long], "a cat": llm.embed(["a cat"])[0]}


@pytest.fixture(scope="module")
def pool(reference):
    from qwen2vl.replicas.launch import start_replicas, stop_replicas

    pool = start_replicas(str(tiny_checkpoint()), ENGINE, 2, num_cpus=2, replica_cpus=0.5, torch_threads=1)
    yield pool
    stop_replicas(pool)


@pytest.fixture(scope="module")
def server(pool):
    from qwen2vl.server.app import create_app

    with serving(create_app(pool, ServerLimits(), api_key=KEY, model_name="tiny")) as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    return OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0, timeout=120)


def conversation(i: int) -> list[dict]:
    return [{"role": "user", "content": f"question {i}: what comes after {i * 7} in this list of numbers?"}]


def replica_stats(pool):
    return [h.stats.remote().result() for h in pool.handles]


def test_concurrent_requests_are_all_answered_as_one_process_answers(client, pool, reference):
    conversations = [conversation(i) for i in range(8)]
    before = [s.prefix_cache_queries for s in replica_stats(pool)]
    answers = ask_all(client, conversations)
    assert answers == reference["short"]
    after = [s.prefix_cache_queries for s in replica_stats(pool)]
    assert all(a > b for a, b in zip(after, before)), f"both replicas should have served: {before} -> {after}"


def test_a_follow_up_goes_to_the_replica_that_cached_its_prefix(client, pool):
    first = [{"role": "user", "content": "a long first turn: " + " ".join(f"word{i}" for i in range(60))}]
    pool.router.load[0] += 100  # replica 0 looks busy: the first turn goes to replica 1
    try:
        r = client.chat.completions.create(model="tiny", messages=first, temperature=0, max_tokens=4)
    finally:
        pool.router.load[0] -= 100
    follow_up = first + [{"role": "assistant", "content": r.choices[0].message.content},
                         {"role": "user", "content": "and then?"}]
    r2 = client.chat.completions.create(model="tiny", messages=follow_up, temperature=0, max_tokens=4)
    # least loaded alone would pick replica 0 (both idle), which holds at most the system prompt's block
    assert r2.usage.prompt_tokens_details.cached_tokens >= r.usage.prompt_tokens // 16 * 16 - 16


def test_embeddings_and_streaming_go_through_the_replicas(client, reference):
    got = client.embeddings.create(model="tiny", input="a cat").data[0].embedding
    assert max(abs(a - b) for a, b in zip(got, reference["a cat"].tolist())) < 1e-4
    stream = client.chat.completions.create(model="tiny", messages=conversation(3), temperature=0, max_tokens=12,
                                            stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == reference["short"][3]


def test_structured_output_is_enforced_on_the_replica(client):
    """The grammar crosses to the replica's process as (tokenizer fingerprint, grammar) and is rebuilt there."""
    schema = {"type": "object", "properties": {"age": {"type": "integer", "minimum": 0, "maximum": 150}},
              "required": ["age"], "additionalProperties": False}
    r = client.chat.completions.create(model="tiny", messages=conversation(1), max_tokens=60, seed=0,
                                       response_format={"type": "json_schema",
                                                        "json_schema": {"name": "a", "schema": schema}})
    assert r.choices[0].finish_reason == "stop", r.choices[0].message.content
    assert set(json.loads(r.choices[0].message.content)) == {"age"}


def test_metrics_sum_the_replicas(server, pool):
    deadline = time.monotonic() + 10
    while True:  # the pool reads the replicas' stats twice a second
        text = httpx.get(f"{server}/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
        got = {m: int(float(v)) for m, v in re.findall(r"^(qwen2vl_\w+) (\S+)$", text, re.M)}
        stats = replica_stats(pool)
        want = {"qwen2vl_prefix_cache_queries_total": sum(s.prefix_cache_queries for s in stats),
                "qwen2vl_kv_cache_blocks": sum(s.num_blocks for s in stats), "qwen2vl_replicas": 2,
                "qwen2vl_replicas_up": 2}
        if all(got.get(k) == v for k, v in want.items()) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert {k: got.get(k) for k in want} == want
    assert want["qwen2vl_prefix_cache_queries_total"] > 0


def test_killing_a_replica_mid_load_loses_no_request(server, pool, reference):
    conversations = [conversation(100 + i) for i in range(4)]
    answers, started = [None] * len(conversations), [threading.Event() for _ in conversations]

    def ask(i):
        text = ""
        with httpx.stream("POST", f"{server}/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                          json={"model": "tiny", "messages": conversations[i], "temperature": 0,
                                "max_tokens": KILL_MAX_TOKENS, "stream": True}, timeout=120) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    body = json.loads(line[6:])
                    assert "error" not in body, body
                    text += body["choices"][0]["delta"].get("content") or "" if body["choices"] else ""
                    if text:
                        started[i].set()
        answers[i] = text

    retries = pool.retries
    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(conversations))]
    for t in threads:
        t.start()
    for e in started:
        assert e.wait(60), "streams did not start"
    victim = max(range(2), key=lambda r: pool.router.load[r])
    assert pool.router.load[victim] > 0
    os.kill(pool.handles[victim].describe.remote().result()["pid"], signal.SIGKILL)
    for t in threads:
        t.join(timeout=120)
    assert pool.retries > retries, "the kill should have hit running requests"
    assert answers == reference["long"]
