"""Engine replicas on Ray Serve: `qwen2vl serve MODEL --replicas N [--ray-address ADDR]` (docs/deployment.md).

    replica.py  the Ray Serve deployment: one AsyncLLM per replica, streaming deltas
    routing.py  which replica a prompt goes to (prefix/image affinity, else the least loaded)
    pool.py     ReplicaPool: what the FastAPI app drives instead of an AsyncLLM (route, retry, stats)
    launch.py   start or join Ray, deploy N replicas, or say how to install Ray

Ray is an optional extra (`pip install -e ".[ray]"`); nothing here is imported without --replicas.
"""
