"""Tensor parallelism over torch.distributed: one process per rank, the decoder's heads and MLP split
across them (plan.py), rank 0 running the engine and sending each forward to the others (group.py,
step.py, worker.py). `LLM(..., tensor_parallel_size=N)` is the one place it is chosen."""
