"""The box attention lesson (qwen2vl/demo/box_attention.py): the rows a head is taught to look at are the named
shape's tokens, the attention it is scored on is the decoder's own, and the objective is the LM loss plus that."""

from __future__ import annotations

import json

import torch
import torch.nn.functional as F

from qwen2vl.attention import packed_causal_attend
from qwen2vl.demo import box_attention
from qwen2vl.demo.box_attention import AttentionLesson, attention_on, box_queries, named_cells
from qwen2vl.demo.scenes import Shape, draw_scene
from qwen2vl.demo.tasks import box_answer
from qwen2vl.hub import resolve_model_path
from qwen2vl.model import Qwen2VL
from qwen2vl.processing.processor import Processor
from qwen2vl.train.batch import pack
from qwen2vl.train.data import read_rows
from qwen2vl.train.examples import encode_row
from qwen2vl.train.step import loss_sum

DEMO = resolve_model_path("demo")
WIDTH, HEIGHT = 280, 196  # multiples of 28: the processor keeps the size, a grid of 7 x 10 merged tokens
RED, BLUE = Shape("square", "red", 20, 20, 45), Shape("circle", "blue", 180, 100, 60)  # no edge on a cell centre


def batch_of(tmp_path):
    """A packed batch: a row of two small pictures (no box), then one picture asked both shapes' boxes."""
    draw_scene(WIDTH, HEIGHT, (230, 230, 230), [RED, BLUE]).save(tmp_path / "a.png")
    draw_scene(168, 112, (230, 230, 230), [RED]).save(tmp_path / "b.png")  # another grid: the count of pictures matters
    rows = [{"messages": [{"role": "user", "content": "<image><image>Which image has more shapes?"},
                          {"role": "assistant", "content": "first"}], "images": ["b.png", "b.png"]},
            {"messages": [{"role": "user", "content": "<image>Where is the red square?"},
                          {"role": "assistant", "content": box_answer(RED, WIDTH, HEIGHT)},
                          {"role": "user", "content": "Where is the blue circle?"},
                          {"role": "assistant", "content": box_answer(BLUE, WIDTH, HEIGHT)}], "images": ["a.png"]}]
    (tmp_path / "rows.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    processor = Processor.from_pretrained(DEMO)
    model = Qwen2VL.from_pretrained(DEMO, dtype=torch.float32)
    batch = pack([encode_row(r, processor, model.config) for r in read_rows(tmp_path / "rows.jsonl")])
    return batch, processor.tokenizer, model


def test_the_taught_rows_are_the_named_shapes_tokens(tmp_path):
    batch, tokenizer, model = batch_of(tmp_path)
    queries = box_queries(batch, tokenizer, model.config.image_token_id)
    assert len(queries) == 2  # the pair's row has no box; the other row two
    ids = batch.input_ids.tolist()
    pads = [i for i in range(batch.cu_seqlens[1], batch.cu_seqlens[2]) if ids[i] == model.config.image_token_id]
    assert len(pads) == 7 * 10 and batch.image_grid_thw[2].tolist() == [1, 14, 20]
    for (query, start, rows), shape in zip(queries, (RED, BLUE)):
        assert start == batch.cu_seqlens[1] and tokenizer.decode([ids[query]]) == "("
        assert tokenizer.decode([ids[query - 1]], skip_special_tokens=False) == "<|box_start|>"
        cells = [r - pads[0] for r in rows]
        x, y, side = shape.x, shape.y, shape.side
        inside = [r * 10 + c for r in range(7) for c in range(10)  # cell centres inside the square, in pixels
                  if x <= (c + 0.5) * 28 <= x + side and y <= (r + 0.5) * 28 <= y + side]
        assert cells == inside and cells


def test_a_box_that_holds_no_cell_centre_names_the_cell_of_its_centre():
    assert named_cells((0, 0, 40, 40), 5, 5) == [0]  # cell centres at 100, 300, ...: none inside
    assert named_cells((610, 810, 640, 840), 5, 5) == [4 * 5 + 3]
    assert named_cells((0, 0, 1000, 1000), 2, 3) == list(range(6))


def test_the_attention_scored_is_the_attention_the_decoder_computes():
    torch.manual_seed(0)
    q, k = torch.randn(12, 4, 16), torch.randn(12, 2, 16)
    start, query, targets = 3, 9, [5, 6, 8]
    for head in range(4):
        v = torch.zeros(12, 2, 16)
        v[targets] = 1.0  # attention times this value is the weight on the targets
        out = F.scaled_dot_product_attention(q[start:query + 1, head][None], k[start:query + 1, head // 2][None],
                                             v[start:query + 1, head // 2][None], is_causal=True)
        torch.testing.assert_close(torch.exp(-attention_on(q, k, query, start, targets, head)), out[0, -1, 0])


def test_the_objective_is_the_lm_loss_plus_the_heads_attention_loss(tmp_path, monkeypatch):
    batch, tokenizer, model = batch_of(tmp_path)
    said = []
    monkeypatch.setattr(box_attention, "EVERY", 1)
    plain = AttentionLesson(tokenizer, model.config.image_token_id, 1, 3, 0.0, log=said.append)
    taught = AttentionLesson(tokenizer, model.config.image_token_id, 1, 3, 2.0, log=said.append)
    seen = {}
    causal = packed_causal_attend(batch.cu_seqlens)

    def watch(layer, q, k, v):  # the decoder's own q and k at each layer, as it computes them
        seen.setdefault(layer, (q, k))
        return causal(layer, q, k, v)

    with torch.no_grad():
        lm = loss_sum(model, batch, watch)
        torch.testing.assert_close(plain(model, batch), lm)
        q, k = seen[1]
        queries = box_queries(batch, tokenizer, model.config.image_token_id)
        expected = torch.stack([attention_on(q, k, *query, 3) for query in queries]).mean()
        assert 0 < float(torch.exp(-expected)) < 1
        torch.testing.assert_close(taught(model, batch), lm + 2.0 * expected * batch.num_targets)
    assert len(said) == 2 and "layer 1, head 3 on the named shape" in said[0]
