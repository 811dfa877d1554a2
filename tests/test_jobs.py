"""Ray jobs: a real local Ray head (dashboard and job server on 127.0.0.1) runs ``directer submit``."""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.dataset as pads
import pytest

ROOT = Path(__file__).resolve().parents[1]
PORT_OPTIONS = (
    "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "runtime-env-agent-port", "metrics-export-port",
    "node-manager-port", "object-manager-port", "ray-client-server-port",
)  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """A Ray head of its own (own ports, own temp dir), stopped by killing its process group."""
    temp = tmp_path_factory.mktemp("ray")
    gcs, dashboard = free_port(), free_port()
    # token authentication, as on a real cluster: the head and every client share one token
    token = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    env = {**os.environ, **token, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    log = open(temp / "head.log", "w")  # noqa: SIM115 - the head writes to it until the fixture ends
    head = subprocess.Popen(
        [str(Path(sys.executable).parent / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
         f"--port={gcs}", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", "--include-dashboard=true",
         "--num-cpus=2", f"--temp-dir={temp}", "--disable-usage-stats",
         # ports of its own, apart from any embedded Ray that earlier tests started in this machine
         *(f"--{name}={free_port()}" for name in PORT_OPTIONS)],
        env=env, start_new_session=True, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    address = f"http://127.0.0.1:{dashboard}"
    # clients run in fresh processes: one that already ran an embedded Ray keeps that cluster's token
    probe = [sys.executable, "-c", f"from jobs.submit import client; client({address!r}).list_jobs()"]
    deadline = time.monotonic() + 300
    while True:
        if subprocess.run(probe, cwd=ROOT, env=env, capture_output=True).returncode == 0:
            break
        if time.monotonic() > deadline or head.poll() is not None:
            if head.poll() is None:
                os.killpg(head.pid, signal.SIGKILL)
            pytest.fail("the Ray head did not start:\n" + (temp / "head.log").read_text()[-3000:])
        time.sleep(2)
    yield address, env
    os.killpg(head.pid, signal.SIGTERM)
    try:
        head.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(head.pid, signal.SIGKILL)
    log.close()


def test_submit_generate_and_wait(ray_head, tmp_path):
    address, env = ray_head
    rows = [{"id": f"row-{i}", "prompt": f"Name a color. Answer in {w}.", "instruction": f"Answer in {w}."}
            for i, w in enumerate(["French", "German", "capitals"])]  # fmt: skip
    (tmp_path / "in.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    output = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "-m", "jobs.cli", "submit", "--address", address, "--wait", "--",
         "generate", str(tmp_path / "in.jsonl"), "--output", str(output), "--max-new-tokens", "4", "--examples", "0"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    job_id = result.stdout.strip().splitlines()[0]
    assert "SUCCEEDED" in result.stderr
    table = pads.dataset(str(output / "data"), format="parquet").to_table().to_pylist()
    assert sorted(r["id"] for r in table) == ["row-0", "row-1", "row-2"]
    assert all(r["status"] == "ok" for r in table)
    status = subprocess.run(
        [sys.executable, "-m", "jobs.cli", "jobs", "status", job_id, "--address", address],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert status.stdout.strip() == "SUCCEEDED"
    logs = subprocess.run(
        [sys.executable, "-m", "jobs.cli", "jobs", "logs", job_id, "--address", address],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert "3 written (3 ok, 0 error)" in logs.stdout
