"""One rank's model: its shards loaded, the device's backend swapped in, the row-parallel linears summed.

A shard is just a smaller linear, so everything the backends do to linears after load (FastLinear's
packed layouts, int8 / int4 and their C kernels, torch's weight-only kernels) happens per shard
unchanged. The all-reduce comes after: `RowParallel` wraps o_proj and down_proj around whatever the
backend made of them. The CPU backend's whole-decode-step C call (decode_step.py) doesn't know
RowParallel, so it declines and the decode runs layer by layer on the same kernels: it can't stop
between a layer's linears for an all-reduce.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn

from qwen2vl.backends import prepare
from qwen2vl.config import Qwen2VLConfig
from qwen2vl.loader import checkpoint_dtype, load_weights
from qwen2vl.model import Qwen2VL
from qwen2vl.parallel.plan import ShardPlan, rank_config


class RowParallel(nn.Module):
    """A row-parallel linear: this rank's partial product [N, out], summed over ranks in place."""

    def __init__(self, linear: nn.Module):
        super().__init__()
        self.linear = linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.linear(x)
        dist.all_reduce(out)
        return out


def load_rank(folder: Path, dtype: torch.dtype | None, device, quantization: str | None, rank: int,
              n: int) -> Qwen2VL:
    """Rank `rank` of `n`'s model of the checkpoint in `folder`, ready to run (but for the group, which
    its forward needs: group.py and worker.py set it up)."""
    config = Qwen2VLConfig.from_pretrained(folder)
    plan = ShardPlan(config.text, rank, n)
    with torch.device("meta"):
        model = Qwen2VL(replace(config, text=rank_config(config.text, n)))
    dtype = dtype or checkpoint_dtype(folder)
    # as llm.load_model: where the CPU backend repacks every linear, the whole ones are maps of the file
    # (loader.py); a shard's slice is always read
    linears = {f"{name}.weight" for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    repacked = torch.device(device).type == "cpu" and (dtype in (torch.bfloat16, torch.float16) or quantization)
    load_weights(model, folder, dtype, device, config.tie_word_embeddings,
                 mapped=linears.__contains__ if repacked else lambda name: False, plan=plan)
    if rank > 0:  # rank 0 embeds, sees and samples for all (plan.py): what it alone holds is dropped here
        model.visual = model.lm_head = model.model.embed_tokens = None
    model.eval()
    prepare(model, quantization)
    for layer in model.model.layers:
        layer.self_attn.o_proj = RowParallel(layer.self_attn.o_proj)
        layer.mlp.down_proj = RowParallel(layer.mlp.down_proj)
    return model
