"""Start (or join) Ray, deploy N engine replicas on Ray Serve, and hand back the pool that drives them.

    pool = start_replicas("Qwen/Qwen2-VL-2B-Instruct", {"dtype": "bfloat16", "device": "cpu"}, 2)
    app = create_app(pool, limits)   # the same FastAPI app as one process serves
    ...
    stop_replicas(pool)

`ray_address` None starts a Ray of this machine (`num_cpus` caps what it may use); an address
("auto", "ray://head:10001", "10.0.0.1:6379") joins a running cluster, whose nodes must have this
package and the model. Ray Serve's own HTTP proxy is off: the ingress is our FastAPI app (pool.py).
"""

from __future__ import annotations

import logging
import re

from qwen2vl.engine.served import ServedModel

log = logging.getLogger("qwen2vl.replicas")

INSTALL_HINT = 'pip install -e ".[ray]" (or pip install "ray[serve]")'
# Ray Serve queues calls past max_ongoing_requests (default 5) in front of a replica; the engine
# batches far more than 5 requests, and the server's --max-queue already bounds admission.
MAX_ONGOING = 4096
# no access-log line per call: the pool reads every replica's stats twice a second
QUIET = {"log_level": "WARNING", "enable_access_log": False}


def import_ray():
    """(ray, serve), or an ImportError that says how to install them."""
    try:
        import ray
        from ray import serve
    except ImportError as e:
        raise ImportError(f"--replicas runs the engine on Ray Serve, which is not installed: {INSTALL_HINT}") from e
    return ray, serve


def start_replicas(model: str, llm_args: dict, num_replicas: int, *, ray_address: str | None = None,
                   num_cpus: float | None = None, replica_cpus: float = 1, replica_gpus: float = 0,
                   torch_threads: int | None = None, max_imbalance: int = 4, name: str = "engine"):
    """Deploy `num_replicas` replicas of `LLM(model, **llm_args)` and return their ReplicaPool.
    `replica_cpus`/`replica_gpus`: what Ray reserves for each (so it spreads them over nodes); `name`
    names their Serve applications `qwen2vl-{name}-{i}`: servers sharing a cluster need their own
    (deploying an application of a taken name replaces it)."""
    if num_replicas < 1:
        raise ValueError(f"--replicas must be at least 1, got {num_replicas}")
    ray, serve = import_ray()
    from ray.exceptions import ActorUnavailableError, RayActorError
    from ray.serve.exceptions import DeploymentUnavailableError

    from qwen2vl.config import Qwen2VLConfig
    from qwen2vl.embedding import read_pooling
    from qwen2vl.engine.sampling_params import generation_defaults
    from qwen2vl.hub import resolve_model_path
    from qwen2vl.processing.processor import Processor
    from qwen2vl.replicas.pool import ReplicaPool
    from qwen2vl.replicas.replica import EngineReplica

    folder = resolve_model_path(model)  # the ingress reads the tokenizer and configs, not the weights
    started_ray = not ray.is_initialized()
    if started_ray:
        ray.init(address=ray_address, num_cpus=num_cpus if ray_address is None else None,
                 include_dashboard=False, logging_level=logging.WARNING)
    serve.start(proxy_location="Disabled", logging_config=QUIET)
    deployment = serve.deployment(EngineReplica).options(
        ray_actor_options={"num_cpus": replica_cpus, "num_gpus": replica_gpus},
        max_ongoing_requests=MAX_ONGOING, logging_config=QUIET)
    apps = [f"qwen2vl-{re.sub(r'[^A-Za-z0-9_.-]+', '-', name)}-{i}" for i in range(num_replicas)]
    targets = [serve.RunTarget(deployment.bind(model, llm_args, torch_threads), name=app, route_prefix=None)
               for app in apps]
    handles = serve.run_many(targets)  # deployed together; returns when every replica has loaded
    info = handles[0].describe.remote().result()
    served = ServedModel(Processor.from_pretrained(folder), Qwen2VLConfig.from_pretrained(folder),
                         generation_defaults(folder), info["lora_names"], read_pooling(folder),
                         info["max_model_len"], info["eos_token_ids"])
    lost = (RayActorError, ActorUnavailableError, DeploymentUnavailableError)
    pool = ReplicaPool(handles, served, info["block_size"], lost, max_imbalance=max_imbalance)
    pool.started_ray, pool.apps = started_ray, apps
    log.info("%d replicas of %s on Ray Serve", num_replicas, model)
    return pool


def stop_replicas(pool) -> None:
    """Delete our Serve applications; shut Ray down if we started it (a joined cluster keeps running)."""
    ray, serve = import_ray()
    pool.shutdown()
    if pool.started_ray:  # our own Ray: stopping it stops Serve and every replica with it
        ray.shutdown()
        return
    for app in pool.apps:
        try:
            serve.delete(app)
        except Exception as e:  # the cluster went first: nothing left to delete
            log.warning("could not delete %s: %s", app, e)
