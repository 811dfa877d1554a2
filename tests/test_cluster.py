"""The cluster launcher config and the placement of actors on GPUs."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from directer.config import SteeringConfig
from pipeline.config import GenerateConfig
from pipeline.run import plan_resources, rows_per_block

ROOT = Path(__file__).resolve().parents[1]


def test_cluster_yaml_is_valid_for_the_ray_launcher():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    validate_config(prepare_config(copy.deepcopy(config)))
    workers = config["available_node_types"]["gpu_worker"]
    assert workers["resources"]["GPU"] >= 1 and workers["max_workers"] > workers["min_workers"] == 0
    assert any("pip install -e ~/directer" in c for c in config["setup_commands"])
    broken = copy.deepcopy(config)
    broken["available_node_types"]["gpu_worker"]["max_workers"] = "many"
    with pytest.raises(Exception, match="is not of type"):
        validate_config(prepare_config(broken))


def plan(resources, node_cpus=None, **fields):
    config = GenerateConfig(inputs=("x",), output="y", steering=SteeringConfig(), **fields)
    return plan_resources(config, resources, node_cpus)


def test_one_actor_per_gpu_by_default():
    planned = plan({"CPU": 32, "GPU": 4})
    assert (planned.actors, planned.gpus_per_actor, planned.cpus_per_actor) == (4, 1.0, 1.0)


def test_a_model_that_needs_two_gpus_takes_two_per_actor():
    planned = plan({"CPU": 32, "GPU": 8}, gpus_per_actor=2)
    assert (planned.actors, planned.gpus_per_actor) == (4, 2)


def test_cpu_actors_leave_a_cpu_for_reads_and_writes():
    planned = plan({"CPU": 2}, actors=2)
    assert planned.gpus_per_actor == 0 and planned.cpus_per_actor == 0.5 and planned.threads_per_actor == 1
    single = plan({"CPU": 2})
    assert single.actors == 1 and single.cpus_per_actor == 1.0 and single.threads_per_actor == 2


def test_a_cpu_actor_s_threads_never_outnumber_one_node_s_cpus():
    """On two 16-CPU nodes one actor runs 16 threads, not the cluster's 32 on 16 cores; four share them."""
    assert plan({"CPU": 32}, node_cpus=16).threads_per_actor == 16
    assert plan({"CPU": 32}, node_cpus=16, actors=4).threads_per_actor == 8
    assert plan({"CPU": 32}, actors=4).threads_per_actor == 8  # one node


def test_explicit_choices_win():
    planned = plan({"CPU": 16, "GPU": 2}, actors=6, gpus_per_actor=0.5, cpus_per_actor=2.0)
    assert (planned.actors, planned.gpus_per_actor, planned.cpus_per_actor) == (6, 0.5, 2.0)


def test_the_actors_device_follows_their_gpus_and_an_explicit_device_wins():
    """The one rule the early memory check, the actors and the rows per call all read: with
    ``--gpus-per-actor 0`` on a GPU machine the actors decode on the CPU, so the check plans for the CPU."""
    assert plan({"CPU": 8, "GPU": 2}).actor_device == "cuda"
    assert plan({"CPU": 8, "GPU": 2}, gpus_per_actor=0).actor_device == "cpu"
    assert plan({"CPU": 8}).actor_device == "cpu"
    assert plan({"CPU": 8, "GPU": 2}, device="cpu").actor_device == "cpu"
    unplanned = GenerateConfig(inputs=("x",), output="y")
    assert unplanned.actor_device is None  # before the cluster is asked: CUDA where there are GPUs
    assert plan({"CPU": 8, "GPU": 2}, device="cpu").gpus_per_actor == 0  # it would hold a GPU it never uses
    assert plan({"CPU": 8, "GPU": 2}, batch_size=8).rows_per_call(1000) == 32  # a GPU actor refills from one call
    assert plan({"CPU": 8, "GPU": 2}, batch_size=8, device="cpu").rows_per_call(1000) == 8


def test_every_actor_gets_rows_however_few():
    """Ray Data gathers a call's rows before it starts: 541 rows (IFEval) in calls of 4 x 128 on 8 GPUs kept
    7 actors idle. Calls and blocks are at most an equal share, and at least a batch where there are enough."""
    eight = plan({"CPU": 64, "GPU": 8})
    assert eight.rows_per_call(541) == 68 and rows_per_block(541, eight) == 68  # 8 blocks of 68: one each
    assert eight.rows_per_call(100_000) == 512 and rows_per_block(100_000, eight) == 512
    cpu = plan({"CPU": 9}, actors=4)
    assert cpu.rows_per_call(10) == 3 and cpu.rows_per_call(1000) == 16 and rows_per_block(1000, cpu) == 63
