"""Start-up without torch._dynamo (2 s of every `qwen2vl chat` on a Zen 3), and `untraced` keeping the
kernels' callers out of a compiled graph once dynamo is loaded."""

from __future__ import annotations

import subprocess
import sys

import torch

from qwen2vl.backends.cpu.untraced import untraced

ANSWER = """
import sys
from pathlib import Path
import qwen2vl
from qwen2vl import LLM, SamplingParams
llm = LLM("demo")
image = str(Path(qwen2vl.__file__).parent / "demo" / "examples" / "shapes.png")
messages = [{"role": "user", "content": [{"type": "image", "image": image},
                                         {"type": "text", "text": "What color is the triangle?"}]}]
print(llm.chat(messages, SamplingParams(temperature=0, max_tokens=4))[0].text)
print("torch._dynamo" in sys.modules)
"""


def test_loading_and_answering_do_not_import_dynamo():
    out = subprocess.run([sys.executable, "-c", ANSWER], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["green", "False"]


def test_an_untraced_function_runs_eagerly_inside_a_compiled_caller():
    seen = []

    def kernel(x):
        seen.append(torch.compiler.is_compiling())
        return x + 1

    def caller(fn):
        return torch.compile(lambda x: fn(x * 2) - 1, backend="eager", dynamic=False)

    x = torch.ones(3)
    assert torch.equal(caller(untraced(kernel))(x), torch.full((3,), 2.0))
    assert seen == [False]  # called, not traced into the graph
    seen.clear()
    caller(kernel)(x)  # the same function undecorated is traced: what the test tells apart
    assert seen == [True]


def test_before_dynamo_is_loaded_the_call_goes_straight_through():
    code = """
import sys
from qwen2vl.backends.cpu.untraced import untraced
f = untraced(lambda a, b=1: a + b)
print(f(2, b=3), "torch._dynamo" in sys.modules)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["5", "False"]
