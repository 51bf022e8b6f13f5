"""The box attention lesson (qwen2vl/demo/box_attention.py): the rows a head is taught to look at are the named
shape's tokens, the attention it is scored on is the decoder's own, and the objective is the LM loss plus that,
plus, when weighted, the box the head's values say and the other heads' attention on the picture."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from qwen2vl.attention import packed_causal_attend
from qwen2vl.demo import box_attention
from qwen2vl.demo.box_attention import AttentionLesson, attention_logs, box_queries, named_cells
from qwen2vl.demo.tasks import box_answer
from qwen2vl.train.step import loss_sum
from tests.helpers.box_rows import BLUE, HEIGHT, RED, WIDTH, batch_of


def test_the_taught_rows_are_the_named_shapes_tokens(tmp_path):
    batch, tokenizer, model = batch_of(tmp_path)
    queries = box_queries(batch, tokenizer, model.config.image_token_id)
    assert len(queries) == 2  # the pair's row has no box; the other row two
    ids = batch.input_ids.tolist()
    pads = [i for i in range(batch.cu_seqlens[1], batch.cu_seqlens[2]) if ids[i] == model.config.image_token_id]
    assert len(pads) == 7 * 10 and batch.image_grid_thw[2].tolist() == [1, 14, 20]
    for query, shape in zip(queries, (RED, BLUE)):
        assert query.start == batch.cu_seqlens[1] and tokenizer.decode([ids[query.row]]) == "("
        assert tokenizer.decode([ids[query.row - 1]], skip_special_tokens=False) == "<|box_start|>"
        assert query.picture == pads and "<|box_start|>({},{}),({},{})".format(*query.box) in box_answer(
            shape, WIDTH, HEIGHT)
        cells = [r - pads[0] for r in query.named]
        x, y, side = shape.x, shape.y, shape.side
        inside = [r * 10 + c for r in range(7) for c in range(10)  # cell centres inside the square, in pixels
                  if x <= (c + 0.5) * 28 <= x + side and y <= (r + 0.5) * 28 <= y + side]
        assert cells == inside and cells


def test_every_position_teaches_each_token_of_the_numbers(tmp_path):
    batch, tokenizer, model = batch_of(tmp_path)
    first = box_queries(batch, tokenizer, model.config.image_token_id)
    every = box_queries(batch, tokenizer, model.config.image_token_id, every_position=True)
    ids = batch.input_ids.tolist()
    for query, shape in zip(first, (RED, BLUE)):
        mine = [q for q in every if q.box == query.box]
        assert all(q.named == query.named and q.picture == query.picture for q in mine)
        numbers = tokenizer.decode([ids[q.row] for q in mine])  # "(" to the last digit, each once, in order
        assert [q.row for q in mine] == list(range(query.row, query.row + len(mine)))
        assert numbers == "({},{}),({},{})".format(*query.box) and numbers + "<|box_end|>" in box_answer(
            shape, WIDTH, HEIGHT)


def test_a_box_that_holds_no_cell_centre_names_the_cell_of_its_centre():
    assert named_cells((0, 0, 40, 40), 5, 5) == [0]  # cell centres at 100, 300, ...: none inside
    assert named_cells((610, 810, 640, 840), 5, 5) == [4 * 5 + 3]
    assert named_cells((0, 0, 1000, 1000), 2, 3) == list(range(6))


def test_the_attention_scored_is_the_attention_the_decoder_computes():
    torch.manual_seed(0)
    q, k = torch.randn(12, 4, 16), torch.randn(12, 2, 16)
    start, rows = 3, [6, 9]
    weights = attention_logs(q, k, rows, start).exp()
    assert weights.shape == (4, 2, 7)
    for head in range(4):
        for i, row in enumerate(rows):
            v = torch.zeros(12, 2, 12)
            v[torch.arange(12), :, torch.arange(12)] = 1.0  # the value of row r is one-hot at r
            out = F.scaled_dot_product_attention(q[start:row + 1, head][None], k[start:row + 1, head // 2][None],
                                                 v[start:row + 1, head // 2][None], is_causal=True)
            torch.testing.assert_close(weights[head, i, :row + 1 - start], out[0, -1, start:row + 1])
            assert float(weights[head, i, row + 1 - start:].sum()) == 0.0  # nothing after the query


def one_query(q, k, v, row, start, head):
    """The attention of one query row and one head, written out: (weights on start..row, its values' output)."""
    kv = head // (q.shape[1] // k.shape[1])
    weights = torch.softmax(k[start:row + 1, kv].double() @ q[row, head].double() / q.shape[-1] ** 0.5, 0)
    return weights, weights @ v[start:row + 1, kv].double()


def test_the_objective_is_the_lm_loss_plus_the_heads_attention_loss(tmp_path, monkeypatch):
    batch, tokenizer, model = batch_of(tmp_path)
    said = []
    monkeypatch.setattr(box_attention, "EVERY", 1)
    plain = AttentionLesson(tokenizer, model.config.image_token_id, 1, 3, 0.0, log=said.append)
    taught = AttentionLesson(tokenizer, model.config.image_token_id, 1, 3, 2.0, log=said.append)
    seen = {}
    causal = packed_causal_attend(batch.cu_seqlens)

    def watch(layer, q, k, v):  # the decoder's own q and k at each layer, as it computes them
        seen.setdefault(layer, (q, k, v))
        return causal(layer, q, k, v)

    with torch.no_grad():
        lm = loss_sum(model, batch, watch)
        torch.testing.assert_close(plain(model, batch), lm)
        q, k, v = seen[1]
        queries = box_queries(batch, tokenizer, model.config.image_token_id)
        on_named = [one_query(q, k, v, x.row, x.start, 3)[0][torch.tensor(x.named) - x.start].sum() for x in queries]
        expected = -torch.log(torch.stack(on_named)).mean()
        assert 0 < float(torch.exp(-expected)) < 1
        torch.testing.assert_close(taught(model, batch).double(), lm.double() + 2.0 * expected * batch.num_targets,
                                   rtol=1e-5, atol=0)
    assert len(said) == 2 and "layer 1, head 3: on the named shape" in said[0]


def test_the_value_and_route_lessons_add_the_box_error_and_the_other_heads_look(tmp_path, monkeypatch):
    batch, tokenizer, model = batch_of(tmp_path)
    said = []
    monkeypatch.setattr(box_attention, "EVERY", 1)
    lesson = AttentionLesson(tokenizer, model.config.image_token_id, 1, 2, 2.0, log=said.append,
                             value_weight=3.0, route_weight=5.0, every_position=True)
    seen = {}
    causal = packed_causal_attend(batch.cu_seqlens)

    def watch(layer, q, k, v):
        seen.setdefault(layer, (q, k, v))
        return causal(layer, q, k, v)

    with torch.no_grad():
        lm = loss_sum(model, batch, watch)
        queries = box_queries(batch, tokenizer, model.config.image_token_id, every_position=True)
        assert len(queries) > 2
        named, error, looks = [], [], []
        for layer, (q, k, v) in seen.items():
            for x in queries:
                for head in range(q.shape[1]):
                    weights, read = one_query(q, k, v, x.row, x.start, head)
                    if layer == 1 and head == 2:  # 2 // 2 is its KV head, not 2 % 2
                        named.append(-torch.log(weights[torch.tensor(x.named) - x.start].sum()))
                        box = torch.tensor(x.box, dtype=torch.float) / 500 - 1  # 0-1000 -> [-1, 1]
                        error.append(((read[:4] - box) ** 2).mean())
                    else:  # every other head of every layer: -log(1 - its attention on the picture)
                        looks.append(-torch.log(1 - weights[torch.tensor(x.picture) - x.start].sum()))
        assert len(looks) == len(queries) * (len(seen) * q.shape[1] - 1)
        extra = 2.0 * torch.stack(named).mean() + 3.0 * torch.stack(error).mean() + 5.0 * torch.stack(looks).mean()
        assert float(max(looks)) > 9  # a head with all but 1e-4 of its attention on the picture: no rounding
        torch.testing.assert_close(lesson(model, batch).double(), lm.double() + extra * batch.num_targets,
                                   rtol=1e-5, atol=0)  # float32 sums; the clamp this replaced was off by 1.6e-4
    assert "value's box error" in said[0] and "others on the picture" in said[0]
