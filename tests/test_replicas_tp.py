"""`qwen2vl serve --replicas 2 --tensor-parallel-size 2`: two Ray Serve replicas, each an engine whose
model is split over two gloo ranks (four engine processes on a local Ray started here, the tiny
checkpoint). Concurrent requests through the server's app must be answered as one process answers
them, token for token, and both replicas must have served."""

from functools import partial

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
ENGINE = {"dtype": "float32", "device": "cpu", "kv_cache_gib": 0.02, "max_model_len": MAX_MODEL_LEN}
# prompts the tiny random model answers differently, so a request answered for another can't pass
PROMPTS = ["apple", "river" * 2, "Zürich" * 3, "12345" * 4, "quantum" * 5, "ÆØÅ" * 6, "hello world" * 7]


def conversation(i: int) -> list[dict]:
    return [{"role": "user", "content": PROMPTS[i]}]


@pytest.fixture(scope="module")
def reference():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        llm = LLM(str(tiny_checkpoint()), **ENGINE)
        outs = llm.chat([conversation(i) for i in range(len(PROMPTS))], partial(SamplingParams, temperature=0)(
            max_tokens=12))
    finally:
        torch.set_num_threads(threads)
    return [o.text for o in outs]


@pytest.fixture(scope="module")
def pool(reference):
    from qwen2vl.replicas.launch import start_replicas, stop_replicas

    pool = start_replicas(str(tiny_checkpoint()), {**ENGINE, "tensor_parallel_size": 2}, 2, num_cpus=2,
                          replica_cpus=0.5, torch_threads=1)
    yield pool
    stop_replicas(pool)


def test_replicas_of_tensor_parallel_engines_answer_as_one_process(pool, reference):
    from qwen2vl.server.app import create_app

    assert len(set(reference)) >= len(PROMPTS) - 1, f"the prompts should get different answers: {reference}"
    before = [h.stats.remote().result().prefix_cache_queries for h in pool.handles]
    with serving(create_app(pool, ServerLimits(), api_key=KEY, model_name="tiny")) as url:
        client = OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=120)
        answers = ask_all(client, [conversation(i) for i in range(len(PROMPTS))])
    assert answers == reference
    after = [h.stats.remote().result().prefix_cache_queries for h in pool.handles]
    assert all(a > b for a, b in zip(after, before)), f"both replicas should have served: {before} -> {after}"



def _spawned_children(pid: int) -> int:
    """Processes `pid` started with multiprocessing's spawn (the tensor-parallel ranks it leads)."""
    from pathlib import Path

    count = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            count += b"spawn_main" in Path(f"/proc/{child}/cmdline").read_bytes()
    return count


def test_each_replica_leads_its_own_second_rank(pool):
    for handle in pool.handles:
        assert _spawned_children(handle.describe.remote().result()["pid"]) == 1
