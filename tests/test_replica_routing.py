"""The replica pool without Ray: routing by table, the re-run of a lost request with fake replicas,
the --replicas flags, and the error when Ray is not installed."""

import argparse
import asyncio
import sys

import pytest

from qwen2vl.engine.outputs import Delta, Usage
from qwen2vl.replicas.pool import ReplicaPool, _unsent
from qwen2vl.replicas.routing import RouteKeys, Router


def router_with(seen: dict[int, list[int]], load: list[int], down=()) -> Router:
    router = Router(len(load), max_imbalance=4)
    for r, keys in seen.items():
        router.record(r, RouteKeys(keys))
    router.load, router.down = list(load), set(down)
    return router


@pytest.mark.parametrize("seen, load, keys, down, exclude, want", [
    ({}, [0, 0], [1, 2], (), (), 0),  # nothing known: least loaded, lowest index
    ({}, [3, 1], [1, 2], (), (), 1),
    ({1: [1, 2, 3]}, [0, 0], [1, 2, 3, 4], (), (), 1),  # the replica that holds the prefix
    ({0: [1], 1: [1, 2, 3]}, [0, 0], [1, 2, 3, 4], (), (), 1),  # the longest leading run wins
    ({0: [1, 2], 1: [2, 3, 4]}, [0, 0], [1, 2, 3, 4], (), (), 0),  # a chain: block 2 without block 1 is no hit
    ({1: [1, 2, 3]}, [0, 4], [1, 2, 3], (), (), 1),  # busier, but within max_imbalance
    ({1: [1, 2, 3]}, [0, 5], [1, 2, 3], (), (), 0),  # too busy: least loaded
    ({1: [1, 2, 3]}, [0, 0], [1, 2, 3], (1,), (), 0),  # down
    ({1: [1, 2, 3]}, [0, 0], [1, 2, 3], (), (1,), 0),  # this request already failed there
    ({1: [1, 2, 3]}, [0, 0], [1, 2, 3], (0, 1), (), 1),  # all down: still the best one (Serve may restart it)
])
def test_router_prefers_the_cached_prefix_unless_busy_or_down(seen, load, keys, down, exclude, want):
    assert router_with(seen, load, down).pick(RouteKeys(keys), set(exclude)) == want


def test_router_follows_images_and_forgets_a_restarted_replica():
    router = Router(3)
    router.record(2, RouteKeys([10], images=[99]))
    assert router.pick(RouteKeys([20], images=[99])) == 2  # another text around the same picture
    router.forget(2)
    assert router.pick(RouteKeys([20], images=[99])) == 0
    small = Router(1, memory=3)
    small.record(0, RouteKeys([1, 2, 3, 4]))
    assert list(small.seen[0]) == [2, 3, 4]  # bounded: the oldest keys go first


def delta(i, text, ids, finish=None, usage=None):
    return Delta("r", i, text, ids, finish, None, usage)


def test_a_rerun_passes_on_only_what_the_caller_has_not_had():
    sent = {}
    first = [_unsent(d, {}, sent) for d in [delta(0, "ab", [1, 2])]]
    got = {}
    rerun = [_unsent(d, got, sent) for d in [delta(0, "a", [1]), delta(0, "bc", [2, 3]),
                                             delta(0, "d", [4], "stop", Usage(5, 4))]]
    assert [(d.text, d.token_ids) for d in first] == [("ab", [1, 2])]
    assert rerun[0] is None and (rerun[1].text, rerun[1].token_ids) == ("c", [3])
    assert (rerun[2].text, rerun[2].token_ids, rerun[2].finish_reason) == ("d", [4], "stop")


def test_a_rerun_that_disagrees_with_what_was_sent_is_an_error():
    sent = {}
    _unsent(delta(0, "ab", [1, 2]), {}, sent)
    with pytest.raises(RuntimeError, match="other tokens"):
        _unsent(delta(0, "ax", [1, 7]), {}, sent)


class Lost(Exception):
    pass


class FakeStream:
    def __init__(self, deltas, fail_after):
        self.deltas, self.fail_after, self.cancelled = deltas, fail_after, False

    def __aiter__(self):
        return self._run()

    async def _run(self):
        for k, d in enumerate(self.deltas):
            if k == self.fail_after:
                raise Lost("replica died")
            yield d

    def cancel(self):
        self.cancelled = True


class FakeReplica:
    """What a Serve handle gives the pool: `.options(stream=True).generate.remote(...)`."""

    def __init__(self, deltas, fail_after=None):
        self.deltas, self.fail_after, self.streams = deltas, fail_after, []

    def options(self, **_):
        return self

    @property
    def generate(self):
        return self

    def remote(self, prompt, params, request_id, lora):
        self.streams.append(FakeStream(self.deltas, self.fail_after))
        self.params = params
        return self.streams[-1]


def test_a_request_whose_replica_dies_is_finished_on_the_other(monkeypatch, tiny_prompt):
    answer = [delta(0, "x", [5]), delta(0, "y", [6]), delta(0, "z", [7], "length", Usage(3, 3))]
    dying, healthy = FakeReplica(answer, fail_after=2), FakeReplica(answer)
    pool = ReplicaPool([dying, healthy], tiny_prompt.served, 16, (Lost,))
    monkeypatch.setattr(pool, "_start_probe", lambda: None)

    async def run():
        return [d async for d in pool.generate(tiny_prompt.prompt, pool.default_sampling_params(temperature=0.7))]

    got = asyncio.run(run())
    assert "".join(d.text for d in got) == "xyz" and [t for d in got for t in d.token_ids] == [5, 6, 7]
    assert pool.retries == 1 and pool.router.down == {0} and pool.router.load == [0, 0]
    assert dying.params.seed is not None and healthy.params.seed == dying.params.seed  # same draws on the re-run


@pytest.fixture(scope="module")
def tiny_prompt():
    """A ServedModel and a Prompt of the tiny checkpoint (no engine)."""
    from types import SimpleNamespace

    from qwen2vl.config import Qwen2VLConfig
    from qwen2vl.embedding import read_pooling
    from qwen2vl.engine.prompt import Prompt
    from qwen2vl.engine.served import ServedModel
    from qwen2vl.processing.processor import Processor
    from tests.helpers.checkpoints import tiny_checkpoint

    folder = tiny_checkpoint()
    served = ServedModel(Processor.from_pretrained(folder), Qwen2VLConfig.from_pretrained(folder), {}, [],
                         read_pooling(folder), 256, [0])
    prompt = Prompt.from_inputs(served.processor([{"role": "user", "content": "hi"}], True), served.config)
    return SimpleNamespace(served=served, prompt=prompt)


def test_replicas_without_ray_say_how_to_install_it(monkeypatch, capsys):
    from qwen2vl.cli import main
    from tests.helpers.checkpoints import tiny_checkpoint

    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now raises ImportError
    assert main(["serve", str(tiny_checkpoint()), "--replicas", "2", "--device", "cpu"]) == 1
    assert 'pip install -e ".[ray]"' in capsys.readouterr().err


def test_replica_flags_reach_every_replica_unchanged(monkeypatch):
    import qwen2vl.replicas.launch as launch
    from qwen2vl.server.cli import add_serve_arguments, run_serve

    class Stop(Exception):
        pass

    seen = {}

    def fake_start(model, llm_args, num_replicas, **options):
        seen.update(model=model, llm_args=llm_args, num_replicas=num_replicas, **options)
        raise Stop

    monkeypatch.setattr(launch, "start_replicas", fake_start)
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    args = parser.parse_args(["m", "--replicas", "3", "--ray-address", "auto", "--device", "cpu",
                              "--quantization", "int8", "--max-model-len", "512", "--replica-cpus", "2"])
    with pytest.raises(Stop):
        run_serve(args)
    assert seen["num_replicas"] == 3 and seen["ray_address"] == "auto" and seen["replica_cpus"] == 2
    assert seen["name"] == "m"  # the served model name: servers sharing a cluster keep their own replicas
    assert seen["llm_args"]["quantization"] == "int8" and seen["llm_args"]["max_model_len"] == 512
    with pytest.raises(ValueError, match="--ray-address"):
        run_serve(parser.parse_args(["m", "--ray-address", "auto", "--device", "cpu"]))
