"""Decode CUDA graphs (engine/cuda_graph.py) and the Triton decode kernel (backends/cuda/triton_decode.py).

On CUDA: the kernel against the torch decode path on random paged caches (mixed lengths, GQA
ratios, head sizes, dtypes, int32/int64 tables) and replayed in a graph; graphed generation against
the eager engine token for token in float32, with each graph attention, and step by step on forced
tokens in bf16; no host sync inside a graphed step.
Everywhere (CPU too): a CPU engine builds no graphs and no spare block; the graph runner's
static-buffer forward (everything a graph holds, minus the capture) gives the eager tokens; a
failed capture leaves the engine eager.

    python3 -m pytest -q tests/test_engine_cuda_graph.py
"""

from __future__ import annotations

import pytest
import torch

from qwen2vl.backends.paged_attention import PagedBatch, decode_padded
from qwen2vl.engine.cuda_graph import GraphRunner, build_graph_runner
from qwen2vl.engine.engine import Engine, EngineConfig
from qwen2vl.engine.prompt import Prompt
from qwen2vl.engine.sampling_params import SamplingParams
from qwen2vl.model import Qwen2VL
from tests.helpers.checkpoints import build_reference, save_checkpoint

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
# small blocks and few sequences: many table columns, every bucket (1, 2, 4, 8) and padding used
CONFIG = dict(kv_cache_gib=0.02, block_size=4, max_num_seqs=8, max_model_len=256)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("graph_ckpt")
    # the real vocab size: a random greedy token is then almost never an image/video pad id, which
    # the eager path would refuse to embed without pixels; untied, so tokens don't just repeat
    save_checkpoint(build_reference(vocab_size=151936, tie=False), folder)
    return folder


def prompts(config) -> list[Prompt]:
    """Text prompts of several lengths and one with an image (rope_delta != 0), built from ids."""
    g = torch.Generator().manual_seed(0)
    words = lambda n: torch.randint(0, 5000, (n,), generator=g).tolist()
    out = [Prompt.from_inputs({"input_ids": words(n)}, config) for n in (3, 17, 1, 40)]
    pads = [config.image_token_id] * 6  # grid 1 x 4 x 6 patches, merged 2 x 2
    ids = words(5) + [config.vision_start_token_id] + pads + [config.vision_end_token_id] + words(4)
    inputs = {"input_ids": ids, "pixel_values": torch.randn(24, 1176, generator=g),
              "image_grid_thw": torch.tensor([[1, 4, 6]])}
    out.append(Prompt.from_inputs(inputs, config))
    return out


# different lengths so the batch shrinks through the buckets; one seeded sampled request
PARAMS = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for m in (12, 5, 9, 16)] + [
    SamplingParams(temperature=0.8, top_p=0.9, seed=7, max_tokens=10, ignore_eos=True)]


def generate(engine: Engine, config) -> list[list[int]]:
    reqs = [engine.add_request(str(i), p, params) for i, (p, params) in enumerate(zip(prompts(config), PARAMS))]
    while engine.has_work():
        engine.step()
    return [r.seqs[0].completion_token_ids for r in reqs]


# ---- everywhere --------------------------------------------------------------------------------


def test_cpu_engine_builds_no_graphs(folder):
    model = Qwen2VL.from_pretrained(folder, dtype=torch.float32)
    engine = Engine(model, EngineConfig(**CONFIG))
    assert engine.runner.graphs is None
    assert engine.cache.num_blocks == engine.scheduler.blocks.num_blocks  # no spare block either


def test_static_decode_forward_gives_the_eager_tokens(folder):
    """The graph runner without the capture: static buffers, bucket padding written into a block no
    sequence owns, positions from rope_delta, the masked torch attention over fixed-width tables; the
    cache (allocated uninitialized) is filled with NaN first, which no output may see."""
    model = Qwen2VL.from_pretrained(folder, dtype=torch.float32)
    want = generate(Engine(model, EngineConfig(**CONFIG)), model.config)
    engine = Engine(model, EngineConfig(**CONFIG))
    engine.cache.k.fill_(float("nan")), engine.cache.v.fill_(float("nan"))
    blocks = engine.scheduler.blocks
    spare = blocks.num_blocks - 1
    del blocks.free[spare]  # on CUDA the engine allocates one past the manager's; here, by hand
    runner = GraphRunner(model, engine.cache, CONFIG["max_num_seqs"], engine.max_model_len, spare,
                         "torch", capture=False)
    engine.runner.graphs = runner
    assert generate(engine, model.config) == want
    assert runner.num_replays >= 15  # the decode steps took this path


def test_failed_capture_leaves_the_engine_eager(folder, monkeypatch, caplog):
    def fail(self):
        raise RuntimeError("capture refused")

    monkeypatch.setattr(GraphRunner, "capture", fail)
    model = Qwen2VL.from_pretrained(folder, dtype=torch.float32)
    engine = Engine(model, EngineConfig(**CONFIG))
    with caplog.at_level("WARNING", logger="qwen2vl.engine.cuda_graph"):
        runner = build_graph_runner(model, engine.cache, 8, engine.max_model_len, spare_block=0, attention="torch")
    assert runner is None
    assert "capture refused" in caplog.text and "run eagerly" in caplog.text


# ---- CUDA only ---------------------------------------------------------------------------------


def random_paged(hq, hkv, dh, block_size, lens, dtype, seed=0, device="cuda"):
    """q, a shuffled paged cache, tables padded with junk block ids (never to be read), lengths."""
    g = torch.Generator(device=device).manual_seed(seed)
    width = max(-(-n // block_size) for n in lens) + 3
    num_blocks = len(lens) * width + 5
    k, v = (torch.randn(num_blocks, block_size, hkv, dh, generator=g, device=device, dtype=dtype) for _ in "kv")
    tables = torch.randperm(num_blocks, generator=g, device=device)[: len(lens) * width].view(len(lens), width)
    q = torch.randn(len(lens), hq, dh, generator=g, device=device, dtype=dtype)
    return q, k, v, tables, torch.tensor(lens, device=device)


# Triton's interpreter runs the kernel on the CPU (tests/conftest.py): the indexing, the slices
# and their combination are checked here too; speed and the compiled code only on a GPU
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("splits", [1, 4, 16])  # 16: most of the 2B's slices hold no keys at all
@pytest.mark.parametrize("lens", [[1, 5, 130, 64], [300]])
def test_triton_decode_splits_the_context_and_combines_exactly(splits, lens):
    pytest.importorskip("triton")
    from qwen2vl.backends.cuda import triton_decode

    q, k, v, tables, lens_t = random_paged(12, 2, 128, 16, lens, torch.float32, device=DEVICE)
    want = decode_padded(q, k, v, PagedBatch.context_slots(tables, 16, max(lens), lens_t), lens_t)
    torch.testing.assert_close(triton_decode.decode(q, k, v, tables, lens_t, splits=splits), want,
                               atol=1e-5, rtol=1e-5)


def test_the_context_is_split_only_where_the_batch_leaves_the_gpu_idle():
    pytest.importorskip("triton")
    from qwen2vl.backends.cuda.triton_decode import num_splits

    cpu = torch.device("cpu")  # counted as an H100's 132 multiprocessors
    assert [num_splits(b, 12, cpu) for b in (1, 2, 4, 8, 16, 32, 64)] == [16, 16, 8, 4, 2, 1, 1]
    assert num_splits(1, 28, cpu) == 16 and num_splits(8, 28, cpu) == 2


@cuda
@pytest.mark.parametrize("hq, hkv, dh, block_size", [
    (4, 2, 16, 4),  # the tiny test model
    (12, 2, 128, 16),  # Qwen2-VL-2B: 6 query heads per kv head
    (28, 4, 128, 16),  # 7B: 7 per kv head
    (8, 8, 64, 8),  # no GQA
    (10, 2, 80, 16),  # a head size that is not a power of two
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_decode_matches_torch_decode(hq, hkv, dh, block_size, dtype):
    from qwen2vl.backends.cuda import triton_decode

    lens = [1, 2 * block_size, 5, 3 * block_size + 1, 130, 17, 64]
    q, k, v, tables, lens_t = random_paged(hq, hkv, dh, block_size, lens, dtype)
    ctx_slots = PagedBatch.context_slots(tables, block_size, max(lens), lens_t)
    want = decode_padded(q, k, v, ctx_slots, lens_t)
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(triton_decode.decode(q, k, v, tables, lens_t), want, **tol)
    torch.testing.assert_close(triton_decode.decode(q, k, v, tables.int(), lens_t.int()), want, **tol)


@cuda
def test_triton_decode_replays_in_a_graph_with_new_lengths():
    from qwen2vl.backends.cuda import triton_decode

    q, k, v, tables, lens = random_paged(12, 2, 128, 16, [40, 7, 100], torch.bfloat16)
    triton_decode.decode(q, k, v, tables, lens)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = triton_decode.decode(q, k, v, tables, lens)
    for new in ([1, 2, 3], [130, 64, 16]):
        lens.copy_(torch.tensor(new))
        graph.replay()
        want = decode_padded(q, k, v, PagedBatch.context_slots(tables, 16, max(new), lens), lens)
        torch.testing.assert_close(out, want, atol=2e-2, rtol=2e-2)


@cuda
@pytest.mark.parametrize("attention", ["triton", "torch"])
def test_graphed_generation_equals_eager(folder, attention, monkeypatch):
    """float32, so the two attention paths differ only by rounding: every token must agree,
    greedy and seeded sampling alike."""
    monkeypatch.setenv("QWEN2VL_DECODE_ATTENTION", attention)
    model = Qwen2VL.from_pretrained(folder, dtype=torch.float32, device="cuda")
    eager = Engine(model, EngineConfig(**CONFIG, enforce_eager=True))
    assert eager.runner.graphs is None
    want = generate(eager, model.config)
    del eager
    graphed = Engine(model, EngineConfig(**CONFIG))
    graphs = graphed.runner.graphs
    assert graphs is not None and graphs.attention == attention and sorted(graphs.graphs) == [1, 2, 4, 8]
    assert generate(graphed, model.config) == want
    assert graphs.num_replays >= 15


def forced_logits(engine: Engine, config) -> list[torch.Tensor]:
    """Every request follows fixed random tokens (a logits processor forces them), so two engines
    see the same inputs at every step whatever their rounding; returns each step's logits rows."""
    g = torch.Generator().manual_seed(1)
    seen = []

    def force(tokens):
        def process(done, row):
            seen.append(row.float().clone().cpu())  # clone: on CPU .cpu() would alias the row
            out = torch.full_like(row, float("-inf"))
            out[tokens[len(done)]] = 0
            return out
        return process

    params = [SamplingParams(temperature=0, max_tokens=p.max_tokens, ignore_eos=True,
                             logits_processors=[force(torch.randint(0, 5000, (p.max_tokens,), generator=g).tolist())])
              for p in PARAMS]
    for i, (prompt, p) in enumerate(zip(prompts(config), params)):
        engine.add_request(str(i), prompt, p)
    while engine.has_work():
        engine.step()
    return seen


@cuda
def test_graphed_bf16_logits_match_eager_step_by_step(folder):
    """bf16 rounds differently in the kernel and in SDPA, so free-running greedy tokens may part
    after a near-tie; on forced tokens every step's logits must stay close (measured on CPU with
    the kernel interpreted: <= 1.6% of the row's largest logit; a broken graph is off by ~100%)."""
    model = Qwen2VL.from_pretrained(folder, dtype=torch.bfloat16, device="cuda")
    want = forced_logits(Engine(model, EngineConfig(**CONFIG, enforce_eager=True)), model.config)
    graphed = Engine(model, EngineConfig(**CONFIG))
    assert graphed.runner.graphs is not None
    got = forced_logits(graphed, model.config)
    assert len(got) == len(want) == sum(p.max_tokens for p in PARAMS)
    errors = [((a - b).abs().max() / b.abs().max()).item() for a, b in zip(got, want)]
    agree = sum(int(a.argmax() == b.argmax()) for a, b in zip(got, want))
    assert max(errors) < 0.1 and agree >= 0.8 * len(want), (max(errors), agree, len(want))
    assert graphed.runner.graphs.num_replays >= 15


@cuda
def test_graphed_step_has_no_host_sync(folder, monkeypatch):
    """Inside GraphRunner.run (stage inputs, copy, replay) nothing waits on the device; the one
    sync per step is the sampler's .tolist() afterwards."""
    run = GraphRunner.run

    def strict(self, seqs):
        torch.cuda.set_sync_debug_mode("error")
        try:
            return run(self, seqs)
        finally:
            torch.cuda.set_sync_debug_mode("default")

    monkeypatch.setattr(GraphRunner, "run", strict)
    model = Qwen2VL.from_pretrained(folder, dtype=torch.bfloat16, device="cuda")
    engine = Engine(model, EngineConfig(**CONFIG))
    generate(engine, model.config)
    assert engine.runner.graphs.num_replays >= 15
