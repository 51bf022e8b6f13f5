"""The box probe (qwen2vl/demo/box_probe.py): what it reads at each box's "(" is the decoder's own computation,
and its probe finds a box that is linearly there and not one that is not."""

from __future__ import annotations

import torch

from qwen2vl.attention import packed_causal_attend
from qwen2vl.demo.box_attention import AttentionLesson, box_queries
from qwen2vl.demo.box_probe import gather, probe, report
from qwen2vl.processing.processor import Processor
from qwen2vl.train.data import read_rows
from qwen2vl.train.step import loss_sum
from tests.helpers.box_rows import DEMO, batch_of


def test_what_it_reads_is_what_the_decoder_computes(tmp_path):
    batch, tokenizer, model = batch_of(tmp_path)  # writes rows.jsonl: a pair's row, then one picture asked two boxes
    features, boxes = gather(model, Processor.from_pretrained(DEMO), read_rows(tmp_path / "rows.jsonl"), 1, 3)
    queries = box_queries(batch, tokenizer, model.config.image_token_id)
    assert boxes.tolist() == [list(q.box) for q in queries]
    said = []  # the named-shape attention and the value's box as the lesson scores them, one query each
    lesson = AttentionLesson(tokenizer, model.config.image_token_id, 1, 3, 1.0, log=said.append)
    valued = AttentionLesson(tokenizer, model.config.image_token_id, 1, 3, 0.0, log=said.append, value_weight=1.0)
    seen = {}
    causal = packed_causal_attend(batch.cu_seqlens)

    def watch(layer, q, k, v):
        seen.setdefault(layer, v)
        return causal(layer, q, k, v)

    residual = {}  # the last layer's output stream, every row (the final norm's input)
    hook = model.model.layers[-1].register_forward_hook(
        lambda m, a, out: None if "rows" in residual else residual.update(rows=out[0] + out[1]))
    with torch.no_grad():
        lm = loss_sum(model, batch, watch)
        added = (lesson(model, batch) - lm) / batch.num_targets  # the mean of -log attention on the named shape
        error = (valued(model, batch) - lm) / batch.num_targets  # the value's box's mean squared error in [-1, 1]
        last = model.model(model.embed(batch.input_ids, model.encode_vision(
            batch.input_ids, batch.pixel_values, batch.image_grid_thw, None, None)), batch.positions, causal)
        embeddings = model.embed(batch.input_ids, model.encode_vision(batch.input_ids, batch.pixel_values,
                                                                      batch.image_grid_thw, None, None))
    torch.testing.assert_close(features["on the named shape"].log().neg().mean(), added.float())
    torch.testing.assert_close((((features["value box"] - boxes) / 500) ** 2).mean(), error.float())
    norm = model.model.norm
    for i, q in enumerate(queries):
        torch.testing.assert_close(features["the named shape's tokens"][i], embeddings[q.named].mean(0))
        torch.testing.assert_close(norm(features["after layer 3"][i]), last[q.row])  # the final norm's input
        torch.testing.assert_close(norm(residual["rows"][q.named]), last[q.named])  # the hook's stream is the model's
        torch.testing.assert_close(features["the named shape after layer 3"][i], residual["rows"][q.named].mean(0))
    hook.remove()
    assert set(features) >= {"attention 0", "after layer 3", "value box", "the named shape after layer 0"}
    assert features["after layer 3"].shape == (2, model.config.text.hidden_size)
    lines = report(features, boxes, 1, 3)
    assert len(lines) == 3 + 1 + 3 * model.config.text.num_hidden_layers and "layer 1, head 3" in lines[1]


def test_the_probe_finds_a_box_that_is_linearly_there_and_not_noise():
    torch.manual_seed(0)
    features = torch.randn(400, 16)
    corner = torch.rand(400, 2) * 700
    boxes = torch.cat([corner, corner + 200], dim=1)
    said = probe(torch.cat([features, boxes / 1000 + 0.01 * torch.randn(400, 4)], dim=1), boxes, 300)
    assert said.shape == (100, 4) and float((said - boxes[300:]).abs().max()) < 30
    noise = probe(features, boxes, 300)  # the features say nothing of the box: the probe guesses the mean
    assert float((noise - boxes[300:]).abs().median()) > 80
