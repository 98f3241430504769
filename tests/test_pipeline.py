"""Pipeline stages (`--pipeline-parallel-size`): two stages serve the same tokens as one, each
stage reads only its layers' tensors, the split rule, the layouts refused at start-up, and the
server with two CPU stages."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from benchmarks import bench_pipeline
from replica.engine.request import EngineRequest
from replica.loading.model import model_from_reader, stage_layers
from replica.loading.reader import CheckpointReader
from replica.loading.servable import main as servable_main
from replica.loading.source import VENDORED_CONFIGS, resolve
from replica.startup import load_engine
from replica.wire.flags import add_replica_arguments, replica_specs
from replica.wire.spec import EngineConfig
from replica.wire.stages import split_layers
from tests.test_moe import checkpoint  # noqa: F401 (a fixture: the tiny MoE checkpoint, 3 layers)
from tests.test_paged import run_paging


@pytest.mark.parametrize("model", ["dense", "moe"])
def test_two_stages_serve_the_tokens_of_one(model, checkpoint):  # noqa: F811
    """The paging workload (greedy and seeded samples, n = 3, a prefix-cache hit, a chunked
    prompt, a preempted row) through two stages and two micro-batches, token for token."""
    source = resolve("tiny-random" if model == "dense" else str(checkpoint))
    _, first, results = run_paging(source)
    engine, first_staged, staged = run_paging(source, pipeline_parallel_size=2)
    split = [1, 1] if model == "dense" else [2, 1]  # 3 MoE layers, embedding and head even
    assert [len(stage.layers) for stage in engine.stages] == split
    assert [stage.first_layer for stage in engine.stages] == [0, split[0]]
    assert engine.runner._parts([1] * 4) == [(0, 2), (2, 2)]  # two micro-batches in flight
    assert first_staged == first
    assert {key: r.output_ids for key, r in staged.items()} == {
        key: r.output_ids for key, r in results.items()
    }
    assert engine.info["stages"][1] == {"device": "cpu", "layers": [split[0], sum(split)]}


class CountingReader(CheckpointReader):
    """Counts each tensor it reads."""

    def __init__(self, inner: CheckpointReader) -> None:
        self.reads: dict[str, int] = {}

        def counted(name: str, load):
            def read() -> torch.Tensor:
                self.reads[name] = self.reads.get(name, 0) + 1
                return load()

            return read

        super().__init__({name: counted(name, load) for name, load in inner._loaders.items()})


@pytest.mark.parametrize(
    ("layers", "extra"),
    [
        (range(0, 1), {"model.embed_tokens.weight", "model.layers.1.input_layernorm.weight"}),
        (range(1, 2), {"model.layers.2.input_layernorm.weight"}),
        (range(2, 3), {"model.norm.weight", "lm_head.weight"}),
    ],
)
def test_a_stage_reads_only_its_layers_tensors(checkpoint, layers, extra):  # noqa: F811
    """From the sharded checkpoint: the stage's layers, once each, plus the embedding (first
    stage), the final norm and head (last) or the next layer's input norm (the hand-off's)."""
    reader = CountingReader(CheckpointReader.from_dir(checkpoint))
    config = resolve(str(checkpoint)).config
    stage = model_from_reader(reader, config, "cpu", torch.float32, layers=layers)
    own = {n for n in reader.names if any(n.startswith(f"model.layers.{i}.") for i in layers)}
    assert set(reader.reads) == own | extra
    assert set(reader.reads.values()) == {1}
    assert stage.is_first == (layers.start == 0) and stage.is_last == (layers.stop == 3)


def test_the_split_balances_weights():
    assert split_layers(94, 2, 1.0, 3.0, 3.0) == [range(0, 47), range(47, 94)]
    assert split_layers(10, 2, 1.0, 4.0, 0.0) == [range(0, 3), range(3, 10)]
    assert split_layers(4, 4, 1.0, 100.0, 100.0) == [range(i, i + 1) for i in range(4)]
    big = resolve(str(VENDORED_CONFIGS / "qwen3-235b-a22b-instruct-2507"), True).config
    assert stage_layers(big, 2, int4=True) == [range(0, 47), range(47, 94)]
    dense = resolve(str(VENDORED_CONFIGS / "qwen3-4b"), True).config
    assert stage_layers(dense, 2) == [range(0, 18), range(18, 36)]


def flags(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_replica_arguments(parser)
    return parser.parse_args(["--model", "tiny-random", *argv])


def test_gpus_group_into_replicas_of_p_stages_and_bad_layouts_are_refused(capsys):
    args = flags("--gpus", "0,1,2,3", "--pipeline-parallel-size", "2")
    specs = replica_specs(args, cuda=True)
    assert [(spec.gpus, spec.engine.micro_batches) for spec in specs] == [((0, 1), 2), ((2, 3), 2)]
    same = flags("--gpus", "0,0", "--pipeline-parallel-size", "2")
    # stages that share a GPU cannot overlap: no micro-batches there
    assert [(s.gpus, s.engine.micro_batches) for s in replica_specs(same, cuda=True)] == [
        ((0, 0), 1)
    ]
    cpu = replica_specs(flags("--pipeline-parallel-size", "2"), cuda=False)
    assert [(s.gpus, s.engine.pipeline_parallel_size) for s in cpu] == [((), 2)]
    with pytest.raises(ValueError, match="not a multiple of --pipeline-parallel-size 2"):
        replica_specs(flags("--gpus", "0,1,2", "--pipeline-parallel-size", "2"), cuda=True)
    with pytest.raises(ValueError, match="at least 1, not 0"):
        replica_specs(flags("--pipeline-parallel-size", "0"), cuda=False)
    assert servable_main(["tiny-random", "--pipeline-parallel-size", "3"]) == 2
    assert capsys.readouterr().err.strip().endswith("exceeds the model's 2 layers")
    with pytest.raises(ValueError, match="micro_batches"):
        EngineConfig(micro_batches=3)


def test_the_server_with_two_cpu_stages_answers_as_one_stage(server):
    """Two prompts of each of the course's task kinds (graph, MCQ, open), greedy: the same
    answers from `--pipeline-parallel-size 2 --cpu-replicas 1` as from the one-stage server,
    and /health lists the replica's stages."""
    from tests.server_process import ServerProcess, request
    from tests.shortcuts_dev_data import ROUTE_OF_TASK, rows_of

    prompts = [row["prompt"] for task in ROUTE_OF_TASK for row in rows_of(task)[:2]]
    body = {"prompt": prompts, "max_tokens": 12, "temperature": 0}
    status, expected, _ = request(server.url + "/v1/completions", body)
    assert status == 200
    args = ("--pipeline-parallel-size", "2", "--cpu-replicas", "1")
    with ServerProcess(*args) as staged:
        _, health, _ = request(staged.url + "/health", method="GET")
        status, answer, _ = request(staged.url + "/v1/completions", body)
    assert status == 200
    texts = [choice["text"] for choice in answer["choices"]]
    assert texts == [choice["text"] for choice in expected["choices"]]
    stages = health["replicas"][0]["stages"]
    cpu = {"device": "cpu", "gpu": None}
    assert stages == [{**cpu, "layers": [0, 1]}, {**cpu, "layers": [1, 2]}]


def test_a_prompt_longer_than_the_stages_kv_is_refused_naming_both_lengths():
    engine = load_engine(
        resolve("tiny-random"), EngineConfig(kv_blocks=4, pipeline_parallel_size=2)
    )
    assert engine.max_context == 4 * 16 and {
        s.cache.shape.blocks for s in engine.runner.stages
    } == {4}
    with pytest.raises(ValueError, match=r"prompt of 100 tokens; this engine takes 1\.\.63"):
        engine.add(EngineRequest(0, [1] * 100, 4))


def test_the_benchmark_smoke_run_finds_equal_tokens(tmp_path):
    """bench_pipeline on tiny models on the CPU: every path the GPU run takes, in seconds."""
    argv = ["--smoke", "--out", str(tmp_path), "--new-tokens", "2", "--rows", "1,4", "--with-235b"]
    report = bench_pipeline.main(argv)
    assert report["tokens_equal"] == {"dense": True, "moe": True}
    assert report["tokens_equal_micro_batched"] == {"dense": True, "moe": True}
    assert set(report["step_ratio_two_stages_one_gpu"]) == {"1", "4"}
    assert set(report["step_ms_235b"]) == {"1", "8", "64"} and report["startup_s_235b"] > 0
    assert json.loads((tmp_path / "pipeline-cpu.json").read_text())["date"] == report["date"]


def test_each_stage_runs_on_its_gpu_as_the_replica_process_sees_it(monkeypatch):
    """CUDA_VISIBLE_DEVICES lists a replica's distinct GPUs in order (queueing/replica_link.py):
    GPUs 2 and 3 are cuda:0 and cuda:1 inside it; GPU 0 twice is cuda:0 twice."""
    from replica.wire.spec import ReplicaSpec
    from replica.worker import stage_devices

    config = EngineConfig(pipeline_parallel_size=2)
    assert stage_devices(ReplicaSpec("tiny-random", (), engine=config)) == ["cpu", "cpu"]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert stage_devices(ReplicaSpec("m", (2, 3), engine=config)) == ["cuda:0", "cuda:1"]
    assert stage_devices(ReplicaSpec("m", (0, 0), engine=config)) == ["cuda:0", "cuda:0"]
    assert stage_devices(ReplicaSpec("m", (5,))) == ["cuda:0"]


@pytest.mark.parametrize(
    ("argv", "line"),
    [
        (["--pipeline-parallel-size", "0"], "--pipeline-parallel-size must be at least 1, not 0"),
        (["--pipeline-parallel-size", "3"], "--pipeline-parallel-size 3 exceeds the model's 2"),
    ],
)
def test_the_server_refuses_a_bad_layout_in_one_line(argv, line, capsys):
    import server

    with pytest.raises(SystemExit) as stop:
        server.refuse_unservable(server.parse_args(["--model", "tiny-random", *argv]))
    assert stop.value.code == 2
    [error] = capsys.readouterr().err.strip().splitlines()
    assert line in error
