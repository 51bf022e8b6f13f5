"""The shipped demo model: "demo" resolves and loads offline everywhere, it is a real Qwen2-VL checkpoint
(transformers computes the same logits), and it answers a fixed handful of suite cases right, through
LLM in bf16 and fp32, so a kernel or engine change that breaks answers fails here."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from qwen2vl import LLM, Processor
from qwen2vl.demo.evaluate import run_llm
from qwen2vl.demo.score import score
from qwen2vl.demo.tasks import render_case
from qwen2vl.hub import DEMO_PATH, resolve_model_path

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "qwen2vl" / "demo" / "examples"
# (file, (task, seed, index), question, answer): pictures of suite cases; the first is the README's
# first command, a colour case of seed 0 with >= 2 shapes the shipped checkpoint answers right (the first
# such case of the first checkpoint, still answered right by the current one in bf16 and fp32)
EXAMPLES_SHIPPED = [("shapes.png", ("color", 0, 5), "What color is the triangle?", "green"),
                    ("word.png", ("text", 0, 24), "What does the text say?", "TOINS")]
# (task, seed, index) that must answer right. The rule: for each task, the first RIGHT_PER_TASK indices of seed 0
# that the shipped checkpoint answered right through LLM in both bf16 and fp32 when it was committed (among
# indices 0-29; grounding had one, text none: README.md "Demo model"). A change that breaks any of them changes
# the model's answers: the accuracy table (qwen2vl eval demo) says how much.
RIGHT_PER_TASK = 2
RIGHT = {"color": [0, 1], "count": [0, 1], "video": [0, 1], "two_images": [0, 1], "grounding": [14]}
CASES = [(task, 0, i) for task, indices in RIGHT.items() for i in indices[:RIGHT_PER_TASK]]


@pytest.fixture(scope="module")
def offline():
    """No network for the module: any connection attempt fails the test that makes it."""
    real = socket.socket.connect

    def refuse(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6):
            raise AssertionError(f"the demo model tried to reach the network ({address})")
        return real(self, address)

    socket.socket.connect = refuse
    yield
    socket.socket.connect = real


@pytest.fixture(scope="module")
def llm(offline):
    return LLM("demo", kv_cache_gib=0.05)


def test_demo_resolves_to_the_packaged_folder_and_is_small():
    assert resolve_model_path("demo") == DEMO_PATH
    files = {p.name: p.stat().st_size for p in DEMO_PATH.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "preprocessor_config.json", "generation_config.json"} <= set(files)
    assert sum(files.values()) <= 25 * 2**20


def test_shipped_tokenizer_is_the_one_vocab_builds(tmp_path):
    from qwen2vl.demo.blank import write_blank

    fresh = write_blank(tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json", "preprocessor_config.json", "generation_config.json"):
        assert (fresh / name).read_text() == (DEMO_PATH / name).read_text(), name


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_answers_the_fixed_cases_offline(offline, dtype):
    llm = LLM("demo", dtype=dtype, kv_cache_gib=0.05) if dtype == "float32" else LLM("demo", kv_cache_gib=0.05)
    cases = [render_case(*c) for c in CASES]
    answers = run_llm(llm, cases)
    wrong = [(c.task, c.question, c.answer, a) for c, a in zip(cases, answers) if not score(c, a)]
    assert not wrong


def test_examples_are_suite_cases_and_the_readme_one_is_answered(llm):
    from PIL import Image

    for name, (task, seed, index), question, answer in EXAMPLES_SHIPPED:
        case = render_case(task, seed, index)
        assert np.array_equal(np.asarray(Image.open(EXAMPLES / name).convert("RGB")), np.asarray(case.images[0]))
        assert (case.question, case.answer) == (question, answer)
    name, (task, seed, index), question, answer = EXAMPLES_SHIPPED[0]  # the README's first command
    messages = [{"role": "user", "content": [{"type": "image", "image": str(EXAMPLES / name)},
                                             {"type": "text", "text": question}]}]
    assert run_llm(llm, [render_case(task, seed, index)])[0] == answer
    assert llm.chat(messages, llm.default_sampling_params())[0].outputs[0].text == answer


def test_readme_first_command_answers_offline():
    """The README's first command, `qwen2vl chat --model demo --image <example> QUESTION`, in a fresh process."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    name, _, question, answer = EXAMPLES_SHIPPED[0]
    done = subprocess.run([sys.executable, "-m", "qwen2vl", "chat", "--model", "demo", "--image",
                           f"qwen2vl/demo/examples/{name}", question],
                          capture_output=True, text=True, cwd=REPO, env=env, timeout=180)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[0] == answer
    assert "(6.1 M parameters)" in done.stderr  # the checkpoint's 6,057,856, though the CPU backend packs them
    assert f"--image qwen2vl/demo/examples/{name} \"{question}\"" in (REPO / "README.md").read_text()


def test_info_tokens_and_processor_take_the_name(offline):
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    run = lambda *args: subprocess.run([sys.executable, "-m", "qwen2vl", *args], capture_output=True, text=True,
                                       cwd=REPO, env=env, timeout=120)
    info = run("info", "demo")
    assert info.returncode == 0 and "local folder" in info.stdout and "parameters" in info.stdout
    tokens = run("tokens", "--model", "demo", "qwen2vl/demo/examples/shapes.png")
    assert tokens.returncode == 0 and "from demo" in tokens.stdout
    proc = Processor.from_pretrained("demo")
    config = json.loads((DEMO_PATH / "config.json").read_text())
    assert (proc.image_token_id, proc.video_token_id) == (config["image_token_id"], config["video_token_id"])


def config_image_token_id() -> int:
    return json.loads((DEMO_PATH / "config.json").read_text())["image_token_id"]


def test_transformers_computes_the_same_logits():
    """The folder is a real Qwen2-VL checkpoint: transformers loads it and agrees with our model."""
    transformers = pytest.importorskip("transformers")
    from qwen2vl.model import Qwen2VL

    hf = transformers.Qwen2VLForConditionalGeneration.from_pretrained(str(DEMO_PATH), dtype=torch.float32).eval()
    ours = Qwen2VL.from_pretrained("demo", dtype=torch.float32)
    case = render_case("grounding", 0, 0)
    inputs = Processor.from_pretrained("demo")(case.messages, add_generation_prompt=True)
    with torch.no_grad():
        types = (inputs["input_ids"] == config_image_token_id()).long()[None]  # transformers' mm_token_type_ids
        ref = hf(input_ids=inputs["input_ids"][None], pixel_values=inputs["pixel_values"],
                 image_grid_thw=inputs["image_grid_thw"], mm_token_type_ids=types).logits[0]
    got = ours.logits(inputs["input_ids"], pixel_values=inputs["pixel_values"], image_grid_thw=inputs["image_grid_thw"])
    torch.testing.assert_close(got[:, :ref.shape[-1]], ref.float(), rtol=1e-4, atol=1e-4)
