"""LLM and AsyncLLM behaviour on a tiny random checkpoint: streaming, stop strings across token
boundaries, stop ids, seeds, n > 1, penalties (vs transformers), vision cache, abort, errors."""

from __future__ import annotations

import asyncio

import pytest
import torch

from qwen2vl.engine.async_engine import AsyncLLM
from qwen2vl.engine.llm import LLM
from qwen2vl.engine.sampling_params import SamplingParams
from tests.helpers.parity import CONVERSATIONS, DEVICE, img, make_checkpoint, user

TEXT = CONVERSATIONS["text"]
GREEDY = SamplingParams(temperature=0, max_tokens=10)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    folder = tmp_path_factory.mktemp("engine_llm_ckpt")
    hf = make_checkpoint(folder)
    return LLM(str(folder), dtype="float32", device=DEVICE, kv_cache_gib=0.02, block_size=4, seed=0), hf


@pytest.fixture(scope="module")
def llm(setup):
    return setup[0]


def free_after(llm: LLM) -> bool:
    s = llm.engine.stats()
    return s.num_free_blocks == s.num_blocks and s.num_running == s.num_waiting == 0


def test_stream_chunks_add_up_to_the_chat_output(llm):
    (full,) = llm.chat(TEXT, GREEDY)
    chunks = list(llm.stream(TEXT, GREEDY))
    assert "".join(chunks) == full.text and full.text
    assert [t for c in chunks for t in c.token_ids] == full.token_ids
    assert chunks[-1].finish_reason == "length" and chunks[-1].usage.completion_tokens == 10
    assert all(c.finish_reason is None for c in chunks[:-1])
    assert free_after(llm)


def test_leaving_a_stream_early_aborts_and_frees_blocks(llm):
    for chunk in llm.stream(TEXT, SamplingParams(temperature=0, max_tokens=50)):
        if chunk.token_ids:
            break
    assert free_after(llm)


def test_stop_string_across_token_boundary(llm):
    (full,) = llm.chat(TEXT, GREEDY)
    pieces = [llm.processor.decode([t]) for t in full.token_ids]
    # a stop string made of the end of token 3's text and the start of token 4's
    i = next(i for i in range(2, 8) if pieces[i] and pieces[i + 1])
    stop = pieces[i][-1:] + pieces[i + 1][:1]
    at = full.text.index(stop)
    for include in (False, True):
        params = SamplingParams(temperature=0, max_tokens=10, stop=["never-there", stop],
                                include_stop_str_in_output=include)
        (out,) = llm.chat(TEXT, params)
        assert out.text == full.text[: at + (len(stop) if include else 0)]
        assert (out.finish_reason, out.outputs[0].stop_reason) == ("stop", stop)
        assert out.token_ids == full.token_ids[: len(out.token_ids)] and len(out.token_ids) <= i + 2
        streamed = list(llm.stream(TEXT, params))
        assert "".join(streamed) == out.text  # no piece of the stop string ever leaked
    assert free_after(llm)


def test_stop_token_id_ends_the_output(llm):
    (full,) = llm.chat(TEXT, GREEDY)
    stop_id = full.token_ids[3]
    k = full.token_ids.index(stop_id)
    (out,) = llm.chat(TEXT, SamplingParams(temperature=0, max_tokens=10, stop_token_ids=[stop_id]))
    assert out.token_ids == full.token_ids[: k + 1]
    assert (out.finish_reason, out.outputs[0].stop_reason) == ("stop", stop_id)
    assert out.text == llm.processor.decode(full.token_ids[:k])


def test_seed_reproduces_alone_and_in_a_batch(llm):
    params = SamplingParams(temperature=1.0, max_tokens=8, seed=1234)
    (a,) = llm.chat(TEXT, params)
    outs = llm.chat([CONVERSATIONS["one_image"], TEXT, TEXT],
                    [SamplingParams(temperature=1.0, max_tokens=5), params, SamplingParams(temperature=1.0, seed=9,
                                                                                            max_tokens=8)])
    assert outs[1].token_ids == a.token_ids
    assert outs[2].token_ids != a.token_ids


def test_n_completions_share_the_prompt(llm):
    (one,) = llm.chat(TEXT, GREEDY)
    (out,) = llm.chat(TEXT, SamplingParams(temperature=0, max_tokens=10, n=3))
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert all(c.token_ids == one.token_ids for c in out.outputs)
    assert out.usage.completion_tokens == 30
    (sampled,) = llm.chat(TEXT, SamplingParams(temperature=1.0, max_tokens=10, n=2, seed=3))
    assert sampled.outputs[0].token_ids != sampled.outputs[1].token_ids


def test_repetition_penalty_matches_transformers(setup):
    llm, hf = setup
    conv = CONVERSATIONS["one_image"]
    inputs = llm.processor(conv, add_generation_prompt=True)
    ids = inputs["input_ids"][None]
    types = (ids == llm.model.config.image_token_id).long()
    with torch.no_grad():
        ref = hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), mm_token_type_ids=types,
                          pixel_values=inputs["pixel_values"], image_grid_thw=inputs["image_grid_thw"],
                          max_new_tokens=12, do_sample=False, repetition_penalty=3.0, pad_token_id=0,
                          eos_token_id=sorted(llm.engine.scheduler.eos_token_ids))
    (out,) = llm.chat(conv, SamplingParams(temperature=0, max_tokens=12, repetition_penalty=3.0))
    assert out.token_ids == ref[0, ids.shape[1]:].tolist()


def test_same_image_is_encoded_once(llm):
    calls = []
    encode = llm.engine.runner.encode
    llm.engine.runner.encode = lambda items: calls.append(len(items)) or encode(items)
    try:
        picture = img(77)
        llm.chat([[user(picture, "first question")], [user(picture, "second question")]], GREEDY)
        llm.chat([user(picture, "a third, later")], GREEDY)
    finally:
        llm.engine.runner.encode = encode
    assert calls == [1]


def test_errors_at_the_edge(llm):
    with pytest.raises(ValueError, match="max_model_len"):
        llm.generate([[1] * llm.engine.max_model_len], GREEDY)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        llm.generate([[1, 2, 10**7]], GREEDY)
    with pytest.raises(ValueError, match="2 SamplingParams for 1 prompts"):
        llm.generate([[1, 2, 3]], [GREEDY, GREEDY])
    with pytest.raises(ValueError, match="dtype"):
        LLM("/nonexistent", dtype="int3")
    with pytest.raises(ValueError, match="max_num_batched_tokens"):
        LLM("/nonexistent", max_num_batched_tokens=0)
    assert free_after(llm)


def test_continue_final_message_and_chat_template_kwargs(llm):
    """vLLM's names: a prefilled answer start is continued, not answered after; template kwargs reach
    the template."""
    msgs = TEXT + [{"role": "assistant", "content": "Once upon a time"}]
    want = llm.processor(msgs, continue_final_message=True)["input_ids"].tolist()
    assert llm.processor.decode(want[-4:]) == "Once upon a time"
    assert llm.prompt(msgs, continue_final_message=True).token_ids == want
    (out,) = llm.chat(msgs, GREEDY, continue_final_message=True)
    assert out.prompt_token_ids == want and out.token_ids == llm.generate([want], GREEDY)[0].token_ids
    with pytest.raises(ValueError, match="exclude each other"):
        llm.chat(msgs, GREEDY, add_generation_prompt=True, continue_final_message=True)
    assert llm.prompt(TEXT, add_generation_prompt=False).token_ids == llm.processor(TEXT)["input_ids"].tolist()
    picture = CONVERSATIONS["one_image"]
    numbered = llm.prompt(picture, chat_template_kwargs={"add_vision_id": True})
    assert len(numbered) == len(llm.prompt(picture)) + len(llm.processor.tokenizer.encode("Picture 1: "))
    with pytest.raises(ValueError, match="chat_template_kwargs.*tools"):
        llm.prompt(picture, chat_template_kwargs={"tools": []}, tools=[])
    assert free_after(llm)


def test_token_id_prompts_and_order(llm):
    a, b = [5, 6, 7, 8, 9], list(range(20, 45))
    outs = llm.generate([a, b], GREEDY)
    assert [o.prompt_token_ids for o in outs] == [a, b]
    assert llm.generate([b], GREEDY)[0].token_ids == outs[1].token_ids


def test_async_engine_batches_streams_and_aborts(llm):
    (want_text,) = llm.chat(TEXT, GREEDY)
    (want_image,) = llm.chat(CONVERSATIONS["one_image"], GREEDY)
    engine = AsyncLLM.from_llm(llm)

    async def collect(conv, params, request_id):
        text, tokens, last = "", [], None
        async for delta in engine.generate(conv, params, request_id=request_id):
            text, tokens, last = text + delta.text, tokens + delta.token_ids, delta
        return text, tokens, last

    async def cancelled():
        agen = engine.generate(TEXT, SamplingParams(temperature=0, max_tokens=500), request_id="gone")
        await agen.__anext__()
        await agen.aclose()  # what a disconnecting client does

    async def main():
        results = await asyncio.gather(collect(TEXT, GREEDY, "a"), collect(CONVERSATIONS["one_image"], GREEDY, "b"),
                                       cancelled())
        with pytest.raises(ValueError, match="max_model_len"):
            await collect([user("x " * llm.engine.max_model_len)], GREEDY, "too-long")
        for _ in range(100):  # the abort lands at the engine thread's next step
            if engine.stats().num_running == 0 and engine.stats().num_waiting == 0:
                break
            await asyncio.sleep(0.05)
        return results

    try:
        (ta, ia, la), (tb, ib, lb), _ = asyncio.run(main())
    finally:
        engine.shutdown()
    assert (ta, ia) == (want_text.text, want_text.token_ids)
    assert (tb, ib) == (want_image.text, want_image.token_ids)
    assert la.finish_reason == "length" and la.usage.completion_tokens == 10
    assert free_after(llm)


def test_a_stream_that_falls_behind_gets_merged_increments(llm):
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    (want,) = llm.chat(TEXT, params)
    engine = AsyncLLM.from_llm(llm)

    async def slow_reader():
        deltas = []
        async for delta in engine.generate(TEXT, params, request_id="slow"):
            deltas.append(delta)
            if len(deltas) == 1:
                await asyncio.sleep(1.0)  # the engine runs ahead meanwhile
        return deltas

    try:
        deltas = asyncio.run(slow_reader())
    finally:
        engine.shutdown()
    assert len(deltas) < 12  # fewer events than tokens
    assert "".join(d.text for d in deltas) == want.text
    assert [t for d in deltas for t in d.token_ids] == want.token_ids
    assert deltas[-1].finish_reason == "length" and deltas[-1].usage.completion_tokens == 12
    assert all(d.usage is None and d.finish_reason is None for d in deltas[:-1])


def test_merge_joins_consecutive_increments_of_one_completion():
    from qwen2vl.engine.async_engine import merge
    from qwen2vl.engine.outputs import Delta, TokenLogprob, Usage

    lp = [TokenLogprob(i, -1.0) for i in range(4)]
    deltas = [Delta("r", 0, "a", [1], logprobs=lp[:1]), Delta("r", 0, "b", [2], logprobs=lp[1:2]),
              Delta("r", 1, "c", [3], logprobs=lp[2:3]), Delta("r", 1, "d", [4], "stop", lp[3:], Usage(2, 4))]
    merged = merge(deltas)
    assert [(d.index, d.text, d.token_ids, d.finish_reason) for d in merged] == [
        (0, "ab", [1, 2], None), (1, "cd", [3, 4], "stop")]
    assert merged[0].logprobs == lp[:2] and merged[1].usage == Usage(2, 4)
    assert deltas[0].token_ids == [1] and deltas[0].text == "a"  # the inputs are left alone
