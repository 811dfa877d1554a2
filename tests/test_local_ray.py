"""``directer generate`` and ``eval`` on an embedded local Ray, as a user's shell runs them: a stale
cluster file from an earlier head, actors that can never start, and SIGINT/SIGTERM at any point."""

from __future__ import annotations

import contextlib
import json
import os
import pty
import re
import select
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
from test_jobs import CLI, ROOT, cli, free_port, user_environment, write_rows

RAY_INFO = re.compile(r"\sINFO\s")  # a line of Ray's log: "2026-12-02 00:54:09,143\tINFO dataset.py:..."
# a line of Ray's native log: "[2026-12-02 04:00:27,305 E 28175 28175] core_worker.cc:2465: Actor ..."
RAY_NATIVE = re.compile(r"^\[\d{4}-\d\d-\d\d [\d:,]+ [DIWEF] \d+ \d+\]", re.MULTILINE)


def local_environment(home: Path) -> dict[str, str]:
    """A user's shell with Ray's temp folder of its own (short: Ray's socket paths must fit)."""
    return {**user_environment(home), "RAY_TMPDIR": tempfile.mkdtemp(prefix="rt", dir="/tmp")}


def rows_written(output: Path) -> list[dict]:
    """The rows of every ``*.parquet`` in ``output/data``, read while a run may be writing there: each
    such file must be complete (a half-written one fails the read)."""
    files = sorted(str(p) for p in (output / "data").glob("*.parquet"))
    return pads.dataset(files, format="parquet").to_table(columns=["id", "status"]).to_pylist() if files else []


def jsonl_and_parquet_rows(folder: Path) -> list[str]:
    """Inputs ``row-0`` and ``row-1`` as JSON lines and ``row-p`` as Parquet (which Ray Data samples under a
    progress bar of its own)."""
    inputs = write_rows(folder / "in.jsonl", 2)
    more = folder / "more.parquet"
    pq.write_table(pa.Table.from_pylist([{**json.loads(inputs.read_text().splitlines()[0]), "id": "row-p"}]), more)
    return [str(inputs), str(more)]


def stops_within_seconds(run: subprocess.Popen, signum: int) -> None:
    """``signum`` ends the command within seconds, saying how to resume, with exit status 128 + signum."""
    run.send_signal(signum)
    sent = time.monotonic()
    _, stderr = run.communicate(timeout=60)
    assert time.monotonic() - sent < 15
    assert run.returncode == 128 + signum, stderr[-3000:]
    assert "rerun the same command to resume" in stderr


def test_a_stale_cluster_file_does_not_stop_a_local_run(tmp_path):
    env = local_environment(tmp_path)
    # what a head killed without `ray stop` leaves behind: its address, where nothing answers any more
    cluster_file = Path(env["RAY_TMPDIR"]) / "ray" / "ray_current_cluster"
    cluster_file.parent.mkdir()
    cluster_file.write_text(f"127.0.0.1:{free_port()}")
    result = cli("generate", *jsonl_and_parquet_rows(tmp_path), "--output", str(tmp_path / "out"),
                 "--max-new-tokens", "3", "--examples", "0", env=env, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(r["id"] for r in rows_written(tmp_path / "out")) == ["row-0", "row-1", "row-p"]
    # the screen holds our summary, not Ray's log or bars (those take --ray-logs)
    assert not RAY_INFO.search(result.stderr) and "will hang" not in result.stderr, result.stderr
    assert not RAY_NATIVE.search(result.stderr), result.stderr  # not even "... max_restarts > 0 ..."
    assert "Parquet dataset sampling" not in result.stderr, result.stderr
    assert "3 written (3 ok, 0 error)" in result.stdout


def test_actors_that_cannot_start_fail_within_the_bound(tmp_path):
    inputs = write_rows(tmp_path / "in.jsonl", 1)
    result = cli("generate", str(inputs), "--output", str(tmp_path / "out"), "--gpus-per-actor", "1",
                 "--actor-start-timeout", "5", env=local_environment(tmp_path), timeout=300)  # fmt: skip
    assert result.returncode == 2, result.stderr[-3000:]
    message = result.stderr.strip().splitlines()[-1]
    assert message.startswith("error: no model actor started within 5 s")
    assert "1 GPU" in message and "GPU 0" in message and "--actor-start-timeout" in message


def test_actors_that_fail_to_load_the_model_say_why(tmp_path):
    inputs = write_rows(tmp_path / "in.jsonl", 1)
    result = cli("generate", str(inputs), "--output", str(tmp_path / "out"), "--device", "cuda",
                 env=local_environment(tmp_path), timeout=300)  # fmt: skip
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1] == (
        "error: the model actors could not start: ValueError: device 'cuda': torch sees no cuda device on this "
        "machine; use device cpu (--device cpu)"
    )


def test_sigterm_mid_run_stops_within_seconds_and_a_rerun_resumes(tmp_path):
    env = local_environment(tmp_path)
    output = tmp_path / "out"
    inputs = write_rows(tmp_path / "in.jsonl", 6)
    command = [*CLI, "generate", str(inputs), "--output", str(output), "--batch-size", "1", "--max-new-tokens", "24",
               "--examples", "0"]  # fmt: skip
    run = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 400
    while not rows_written(output) and run.poll() is None and time.monotonic() < deadline:
        time.sleep(0.5)
    assert run.poll() is None, "the run ended before the first block was written"
    stops_within_seconds(run, signal.SIGTERM)
    done = rows_written(output)
    assert 0 < len(done) < 6
    # run.json records the interrupted invocation's rows and speed (a report's tokens/s counts them)
    (stopped,) = json.loads((output / "run.json").read_text())["invocations"]
    assert stopped["interrupted"] and stopped["rows"] == len(done) and stopped["tokens_per_second"] > 0

    rerun = subprocess.run([*command, "--ray-logs"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert RAY_INFO.search(rerun.stderr)  # Ray's own log, asked for
    assert f"{len(done)} already done" in rerun.stdout
    final = rows_written(output)
    assert sorted(r["id"] for r in final) == [f"row-{i}" for i in range(6)]
    assert all(r["status"] == "ok" for r in final)
    assert not list((output / "data").glob(".*"))  # what the interrupted writes left is gone


def test_sigint_during_start_up_stops_eval_within_seconds(tmp_path):
    env = local_environment(tmp_path)
    command = [*CLI, "eval", "ifeval", "--limit", "2", "--output", str(tmp_path / "eval"), "--max-new-tokens", "4"]
    run = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (tmp_path / "eval" / "inputs.parquet").exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    stops_within_seconds(run, signal.SIGINT)


def test_a_terminal_shows_one_bar_of_the_rows_written(tmp_path):
    """In a pseudo-terminal: our bar counts the rows written, and then gives way to the summary; none of
    Ray Data's bars (its Parquet sampling's included) appear."""
    leader, follower = pty.openpty()
    run = subprocess.Popen(
        [*CLI, "generate", *jsonl_and_parquet_rows(tmp_path), "--output", str(tmp_path / "out"),
         "--max-new-tokens", "3", "--examples", "0"],
        cwd=ROOT, env={**local_environment(tmp_path), "COLUMNS": "100"}, stdin=follower, stdout=follower,
        stderr=follower,
    )  # fmt: skip
    os.close(follower)
    screen, deadline = b"", time.monotonic() + 300
    with contextlib.suppress(OSError):  # EIO once the command has exited and the terminal is closed
        while select.select([leader], [], [], max(0.0, deadline - time.monotonic()))[0] and (
            chunk := os.read(leader, 65536)
        ):
            screen += chunk
    os.close(leader)
    assert run.wait(timeout=60) == 0, screen.decode(errors="replace")[-3000:]
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", screen.decode(errors="replace"))  # colours, cursor moves
    assert "directer" in text and "3/3 rows" in text, text[-3000:]
    assert "Parquet dataset sampling" not in text and "Running" not in text, text[-3000:]
    assert "3 written (3 ok, 0 error)" in text


TWO_NODES = """
import json, sys, warnings
import ray
from ray.cluster_utils import Cluster
from ray.util.state import list_tasks
from directer import SteeringConfig
from pipeline.config import GenerateConfig
from pipeline.run import generate

inputs, output = sys.argv[1:]
warnings.filterwarnings("error", message="`ray_remote_args` is deprecated")  # placement by name, as Ray asks
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
cluster.add_node(num_cpus=6)  # the actor takes 2: 4 CPUs to spare where Ray Data could send read and write tasks
cluster.wait_for_nodes()
ray.init(address=cluster.address)
config = GenerateConfig(inputs=(inputs,), output=output, steering=SteeringConfig(max_new_tokens=3),
                        address=cluster.address, actors=1, cpus_per_actor=2, batch_size=3)
report = generate(config, progress=False)
here = ray.get_runtime_context().get_node_id()
tasks = [(t.name, t.node_id == here) for t in list_tasks(limit=10_000, detail=True)]
threads = json.load(open(f"{output}/run.json"))["config"]["threads_per_actor"]
print(json.dumps({"ok": report.ok, "tasks": tasks, "threads": threads}))
ray.shutdown()
cluster.shutdown()
"""


def test_on_two_nodes_the_driver_s_node_reads_the_inputs_and_writes_the_rows(tmp_path):
    """Input and output paths are the driver's (the head's, for a submitted job). With the model actor on
    another node that has CPUs to spare, Ray Data spread read and write tasks there too, onto a disk that
    is not the driver's (one of three writes landed there): they stay on the driver's node, and only the
    rows travel to and from the actor."""
    inputs = write_rows(tmp_path / "rows.jsonl", 24)
    env = local_environment(tmp_path)
    result = subprocess.run([sys.executable, "-c", TWO_NODES, str(inputs), str(tmp_path / "out")], env=env,
                            cwd=ROOT, capture_output=True, text=True, timeout=400)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    run = json.loads(result.stdout.strip().splitlines()[-1])
    assert run["ok"] == 24 and len(rows_written(tmp_path / "out")) == 24
    assert run["threads"] == 6  # the actor's node's CPUs, not the cluster's 7
    io = [(name, here) for name, here in run["tasks"] if name.startswith(("ReadBinary", "Write"))]
    assert io and all(here for _, here in io), io
    model = [here for name, here in run["tasks"] if name.startswith("MapWorker(MapBatches(GenerateStage))")]
    assert model and not any(model)  # the model actor ran on the other node
