"""`untraced`: torch.compiler.disable for the functions that call a C kernel, without importing dynamo.

torch.compiler.disable imports torch._dynamo when it decorates, and that import is 2.2 of the 4.7
seconds `import qwen2vl.cli` takes on a Zen 3 (`python -X importtime`): every `qwen2vl chat` paid it,
though nothing here compiles. Nothing can trace a call before torch._dynamo is loaded (torch.compile
loads it), so the decorator waits: until then a call goes straight to the function; from the first
call that finds dynamo loaded, through torch.compiler.disable(fn), as the eager decorator would.
The wrapper carries dynamo's own mark, so a compiled caller breaks its graph at the call instead of
inlining it.
"""

from __future__ import annotations

import functools
import sys


def untraced(fn):
    disabled = None

    @functools.wraps(fn)
    def call(*args, **kwargs):
        nonlocal disabled
        if disabled is None:
            if "torch._dynamo" not in sys.modules:
                return fn(*args, **kwargs)
            import torch

            disabled = torch.compiler.disable(fn)
        return disabled(*args, **kwargs)

    call._torchdynamo_disable = True  # what dynamo's tracer reads (torch/_dynamo/variables/functions.py)
    return call
