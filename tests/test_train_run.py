"""Training runs on a tiny checkpoint: --resume continues exactly where an interrupted run stopped,
gradient checkpointing changes nothing, a model trained from random weights (vision too) is a checkpoint
transformers and we load, and the CLI end to end: train an adapter, serve it with LLM, merge it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from qwen2vl.processing.processor import Processor
from qwen2vl.train.batch import pack
from qwen2vl.train.data import DataError, read_rows
from qwen2vl.train.examples import encode_row
from qwen2vl.train.feed import check_rows
from qwen2vl.train.loop import TrainConfig, train
from qwen2vl.train.setup import load_for_training
from qwen2vl.train.step import loss_sum
from tests.helpers.training import model_folder, sample_rows, write_jsonl

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("train_run")
    model_folder(root / "base")
    data = write_jsonl(root / "data.jsonl", sample_rows(root))
    return root, data


def config(root, data, output, **kw) -> TrainConfig:
    return TrainConfig(model=str(root / "base"), data=str(data), output=str(root / output), dtype="fp32",
                       lr=1e-2, lora_rank=4, lora_alpha=8, lora_dropout=0.1, batch_size=2, steps=4, seed=3,
                       save_every=2, **kw)


class Interrupted(Exception):
    pass


def interrupt_after_saving(line: str) -> None:
    if line.startswith("saved "):
        raise Interrupted(line)


def test_resume_continues_exactly_like_an_uninterrupted_run(setup):
    root, data = setup
    train(config(root, data, "whole"), log=lambda _: None)
    with pytest.raises(Interrupted):
        train(config(root, data, "cut"), log=interrupt_after_saving)
    assert not (root / "cut" / "adapter_model.safetensors").exists() and (root / "cut" / "checkpoint-2").is_dir()
    lines = []
    train(config(root, data, "cut", resume="latest"), log=lines.append)
    assert lines[0] == f"resumed from {root / 'cut' / 'checkpoint-2'} (step 2)"
    assert [line.split(" |")[0] for line in lines if line.startswith("step ")] == ["step 3/4", "step 4/4"]
    whole = load_file(str(root / "whole" / "adapter_model.safetensors"))
    cut = load_file(str(root / "cut" / "adapter_model.safetensors"))
    assert whole.keys() == cut.keys()
    for name in whole:
        torch.testing.assert_close(cut[name], whole[name], rtol=0, atol=1e-7, msg=name)
    halfway = load_file(str(root / "whole" / "checkpoint-2" / "adapter_model.safetensors"))
    assert any(not torch.equal(halfway[k], whole[k]) for k in whole)  # steps 3-4 did change the adapter
    with pytest.raises(ValueError, match="settings changed .*batch_size was 2, now 1"):
        train(replace(config(root, data, "cut", resume="latest"), batch_size=1), log=lambda _: None)
    with pytest.raises(ValueError, match="is not empty; --resume to continue"):
        train(config(root, data, "whole"), log=lambda _: None)


def test_workers_prepare_the_steps_a_run_without_them_takes(setup):
    """Two worker processes encode the rows ahead: the same rows per step, the same dropout masks (the
    loader must not draw from the global RNG), so the same adapter bit for bit, resumed or not."""
    root, data = setup
    train(config(root, data, "unhelped"), log=lambda _: None)
    with pytest.raises(Interrupted):
        train(config(root, data, "helped", workers=2), log=interrupt_after_saving)
    train(config(root, data, "helped", workers=2, resume="latest"), log=lambda _: None)
    unhelped = load_file(str(root / "unhelped" / "adapter_model.safetensors"))
    helped = load_file(str(root / "helped" / "adapter_model.safetensors"))
    for name in unhelped:
        assert torch.equal(helped[name], unhelped[name]), name


def test_a_row_whose_answers_cannot_be_found_stops_the_run_before_it_starts_with_workers_too(setup):
    root, data = setup
    processor = Processor.from_pretrained(root / "base")
    rows = read_rows(data) * 150  # more than one chunk, so that the workers share them
    check_rows(rows, processor, workers=2)
    rows[-1] = replace(rows[-1], messages=rows[-1].messages[1:])  # opens with the assistant's answer
    for workers in (0, 2):
        with pytest.raises(DataError) as caught:
            check_rows(rows, processor, workers=workers)
        assert str(caught.value) == (f"{rows[-1].where}: message 0 is an assistant answer to nothing; "
                                     "start with a user message")


def test_accumulating_two_micro_batches_equals_one_batch_of_both(setup):
    """The step's loss is the mean over all its trained tokens however the rows are split (the first
    epoch's shuffle is the same for both, so step 1 sees the same two rows): same logged loss and
    gradient norm (Adam's first update hides the gradient's scale, so the adapters alone would not show
    a wrong normalisation), same adapter."""
    root, data = setup
    logged = []
    for name, batch_size, grad_accum in (("one", 2, 1), ("two", 1, 2)):
        lines = []
        train(replace(config(root, data, f"accum-{name}"), batch_size=batch_size, grad_accum=grad_accum, steps=1,
                      save_every=None, lora_dropout=0.0), log=lines.append)
        (step,) = [line for line in lines if line.startswith("step 1/1")]
        logged.append([float(step.split(f"{key} ")[1].split(" ")[0]) for key in ("loss", "grad")])
    assert logged[0] == pytest.approx(logged[1], rel=1e-4)
    one = load_file(str(root / "accum-one" / "adapter_model.safetensors"))
    two = load_file(str(root / "accum-two" / "adapter_model.safetensors"))
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=0, atol=1e-6, msg=name)


def test_gradient_checkpointing_gives_the_same_gradients(setup):
    root, data = setup
    processor = Processor.from_pretrained(root / "base")
    grads = []
    for checkpointing in (False, True):
        model = load_for_training(root / "base", dtype=torch.float32, device="cpu", full=True, train_vision=True,
                                  gradient_checkpointing=checkpointing)
        batch = pack([encode_row(r, processor, model.config) for r in read_rows(data)])
        loss_sum(model, batch).backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, rtol=1e-5, atol=1e-6, msg=name)


def test_full_training_from_random_weights_writes_a_loadable_checkpoint(setup):
    from transformers import Qwen2VLForConditionalGeneration

    from qwen2vl.model import Qwen2VL

    root, data = setup
    bare = root / "bare"  # config, tokenizer and preprocessor files, no weights
    bare.mkdir()
    for f in (root / "base").iterdir():
        if not f.name.endswith(".safetensors"):
            shutil.copy(f, bare / f.name)
    lines = []
    out = train(TrainConfig(model=str(bare), data=str(data), output=str(root / "full"), full=True, train_vision=True,
                            init_random="all", lr=3e-3, batch_size=4, steps=4, dtype="fp32", eval_data=str(data)),
                log=lines.append)
    losses = [float(line.split("loss ")[1].split(" ")[0]) for line in lines if line.startswith("step ")]
    assert losses[-1] < losses[0] - 0.5, losses  # it learns (the eval loss is the last line)
    ids = torch.arange(30)
    ours = Qwen2VL.from_pretrained(out, dtype=torch.float32).logits(ids)
    theirs = Qwen2VLForConditionalGeneration.from_pretrained(out).eval()(input_ids=ids[None]).logits[0]
    torch.testing.assert_close(ours, theirs.detach(), rtol=1e-4, atol=1e-4)
    assert (out / "tokenizer.json").is_file() and (out / "preprocessor_config.json").is_file()


def test_merge_makes_a_full_runs_step_a_checkpoint_folder(setup, capsys):
    """`qwen2vl merge BASE OUTPUT/checkpoint-STEP OUT`: the weights of that step (not the base's, not the
    end's) in a folder that loads; a step of a run on another model is refused by name."""
    from qwen2vl.cli import main
    from qwen2vl.model import Qwen2VL
    from qwen2vl.train.merge import merge

    root, data = setup
    run = root / "full_steps"
    train(TrainConfig(model=str(root / "base"), data=str(data), output=str(run), full=True, train_vision=True,
                      lr=1e-2, batch_size=2, steps=4, save_every=2, dtype="fp32"), log=lambda line: None)
    assert main(["merge", str(root / "base"), str(run / "checkpoint-2"), str(root / "step2")]) == 0
    assert capsys.readouterr().out.strip() == str(root / "step2")
    step = load_file(str(run / "checkpoint-2" / "trainable.safetensors"))
    exported = dict(Qwen2VL.from_pretrained(root / "step2", dtype=torch.float32).named_parameters())
    stored = load_file(str(root / "base" / "model.safetensors"))["model.layers.0.mlp.up_proj.weight"].dtype
    for name, t in step.items():
        torch.testing.assert_close(exported[name], t.to(stored).float(), rtol=0, atol=0, msg=name)
    base, end = (dict(Qwen2VL.from_pretrained(f, dtype=torch.float32).named_parameters()) for f in (root / "base", run))
    name = "model.layers.0.mlp.up_proj.weight"
    assert not torch.equal(exported[name], base[name]) and not torch.equal(exported[name], end[name])
    assert (root / "step2" / "tokenizer.json").is_file()

    other = root / "other_model_step"  # a layer the base has not
    other.mkdir()
    save_file({"model.layers.9.mlp.up_proj.weight": step[name]}, str(other / "trainable.safetensors"))
    with pytest.raises(ValueError, match=r"model\.layers\.9\.mlp\.up_proj\.weight.*another model"):
        merge(root / "base", other, root / "nowhere")


def test_stop_after_ends_where_a_run_stopped_by_hand_was_on_its_schedule(setup):
    """--stop-after STEP: the weights of step STEP of the --steps run (its checkpoint), the learning rate
    on the whole run's cosine, not one squeezed into STEP steps; a step past the run is refused."""
    from qwen2vl.model import Qwen2VL

    root, data = setup
    full = dict(model=str(root / "base"), data=str(data), full=True, train_vision=True, lr=1e-2, batch_size=2,
                steps=4, save_every=2, dtype="fp32")
    whole_lines, cut_lines = [], []
    train(TrainConfig(output=str(root / "stop_whole"), **full), log=whole_lines.append)
    train(TrainConfig(output=str(root / "stop_cut"), stop_after=2, **full), log=cut_lines.append)
    assert cut_lines[0].endswith(", stopping after step 2")
    steps = [line for line in cut_lines if line.startswith("step ")]
    assert [line.split(" |")[0] for line in steps] == ["step 1/4", "step 2/4"]
    lr = lambda line: line.split(" | ")[3]
    assert [lr(line) for line in steps] == [lr(line) for line in whole_lines if line.startswith("step ")][:2]
    step2 = load_file(str(root / "stop_whole" / "checkpoint-2" / "trainable.safetensors"))
    cut = dict(Qwen2VL.from_pretrained(root / "stop_cut", dtype=torch.float32).named_parameters())
    stored = load_file(str(root / "base" / "model.safetensors"))["model.layers.0.mlp.up_proj.weight"].dtype
    for name, t in step2.items():
        torch.testing.assert_close(cut[name], t.to(stored).float(), rtol=0, atol=0, msg=name)
    assert (root / "stop_cut" / "checkpoint-2").is_dir()  # resumable: --resume without --stop-after ends the run
    with pytest.raises(ValueError, match=r"--stop-after 5 is past the run's last step \(4\)"):
        train(TrainConfig(output=str(root / "stop_never"), stop_after=5, **full), log=lambda line: None)


def test_vision_lr_and_init_scale_reach_the_vision_tower_only(setup):
    """--vision-lr: the vision tower (merger included) steps at its own rate; --init-vision-scale: the
    merger's output layer starts scaled (visual features near the text embeddings' size)."""
    from qwen2vl.train.setup import random_model

    root, data = setup
    torch.manual_seed(0)
    plain = random_model(root / "base", "cpu")
    torch.manual_seed(0)
    scaled = random_model(root / "base", "cpu", vision_scale=0.1)
    torch.testing.assert_close(scaled.visual.merger.mlp[-1].weight, 0.1 * plain.visual.merger.mlp[-1].weight)
    torch.testing.assert_close(scaled.visual.merger.mlp[0].weight, plain.visual.merger.mlp[0].weight)
    torch.testing.assert_close(scaled.model.embed_tokens.weight, plain.model.embed_tokens.weight)

    base = load_file(str(root / "base" / "model.safetensors"))

    def moved(vision_lr) -> dict[str, float]:
        """Mean change of a vision and a decoder weight after one step (Adam moves each by about its lr)."""
        out = root / f"vision_lr_{vision_lr}"
        train(TrainConfig(model=str(root / "base"), data=str(data), output=str(out), full=True, train_vision=True,
                          lr=1e-3, vision_lr=vision_lr, batch_size=4, steps=1, dtype="fp32"), log=lambda line: None)
        trained = load_file(str(out / "model.safetensors"))
        return {k: (trained[k].float() - base[k].float()).abs().mean().item()
                for k in ("visual.merger.mlp.2.weight", "model.layers.0.mlp.up_proj.weight")}

    same, slow = moved(None), moved(1e-5)
    decoder, vision = "model.layers.0.mlp.up_proj.weight", "visual.merger.mlp.2.weight"
    assert slow[decoder] == pytest.approx(same[decoder], rel=1e-3)  # the decoder's rate is --lr either way
    assert slow[vision] < same[vision] / 20


def test_loraplus_steps_the_b_matrices_at_ratio_times_the_rate(setup):
    """--loraplus-ratio: Adam's first step moves each weight by about its group's rate, so B (zero at the
    start, the only LoRA half with a gradient then) moves ratio x as far as without LoRA+."""
    root, data = setup

    def b_moved(ratio) -> float:
        out = f"loraplus_{ratio}"
        train(replace(config(root, data, out, loraplus_ratio=ratio), steps=1, save_every=None, lr=1e-4),
              log=lambda line: None)
        adapter = load_file(str(root / out / "adapter_model.safetensors"))
        return torch.stack([w.abs().mean() for name, w in adapter.items() if "lora_B" in name]).mean().item()

    assert b_moved(10.0) == pytest.approx(10 * b_moved(None), rel=1e-3)


def qwen2vl(*args, cwd=REPO) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "qwen2vl", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=600)


def test_cli_trains_an_adapter_that_llm_serves_and_merge_folds_in(setup, capsys):
    from qwen2vl.cli import main
    from qwen2vl.engine.llm import LLM
    from qwen2vl.engine.sampling_params import SamplingParams

    root, data = setup
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    r = subprocess.run([sys.executable, "-m", "qwen2vl", "train", "--model", str(root / "base"), "--data", str(data),
                        "--output", str(root / "cli"), "--steps", "2", "--batch-size", "2", "--lr", "1e-2",
                        "--eval-data", str(data)], capture_output=True, text=True, cwd=REPO, env=env, timeout=600)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str(root / "cli")
    assert "step 2/2" in r.stderr and "eval loss" in r.stderr
    llm = LLM(root / "base", lora={"cli": root / "cli"}, dtype="float32", kv_cache_gib=0.02)
    messages = [{"role": "user", "content": "Say hi."}]
    params = SamplingParams(temperature=0, max_tokens=4)
    tuned = llm.chat(messages, params, lora="cli")[0].token_ids
    assert tuned != llm.chat(messages, params)[0].token_ids  # trained (B moved from zero) and applied
    assert main(["merge", str(root / "base"), str(root / "cli"), str(root / "cli-merged")]) == 0
    assert capsys.readouterr().out.strip() == str(root / "cli-merged")
    merged = LLM(root / "cli-merged", dtype="float32", kv_cache_gib=0.02)
    assert merged.chat(messages, params)[0].token_ids == tuned


def test_cli_reports_a_bad_row_in_one_line(setup, capsys):
    from qwen2vl.cli import main

    root, _ = setup
    bad = write_jsonl(root / "bad.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}])
    assert main(["train", "--model", str(root / "base"), "--data", str(bad), "--output", str(root / "never")]) == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"error: {bad}:1: no assistant message to learn from"
    assert main(["train", "--model", str(root / "base"), "--data", str(bad), "--output", str(root / "never"),
                 "--train-vision"]) == 1
    assert "error: --train-vision needs --full" in capsys.readouterr().err
