"""Ray jobs on a real local Ray head, started as a user starts one.

The user's machine: a token in ``~/.ray/auth_token`` (any local ``ray.init()`` writes one), and
neither ``RAY_AUTH_MODE`` nor ``RAY_AUTH_TOKEN`` in the environment. ``ray start --head`` then turns
token authentication on, and the client must find the token itself. Heads use ports of their own
and a temporary ``HOME`` and temp folder, and are stopped by killing their process group.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.dataset as pads
import pytest

ROOT = Path(__file__).resolve().parents[1]
PORT_OPTIONS = (
    "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "runtime-env-agent-port", "metrics-export-port",
    "node-manager-port", "object-manager-port", "ray-client-server-port",
)  # fmt: skip
CLI = [sys.executable, "-m", "jobs.cli"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def user_environment(home: Path) -> dict[str, str]:
    """A user's shell: their own HOME, no Ray authentication variables, the project's Python on PATH, and
    the converted bundled model shared with the other tests (``$DIRECTER_CACHE``)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_AUTH", "RAY_ADDRESS"))}
    env.setdefault("DIRECTER_CACHE", str(Path.home() / ".cache" / "directer"))
    env["HOME"] = str(home)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    return env


class Head:
    """``ray start --head --block`` in its own process group."""

    def __init__(self, env: dict[str, str]) -> None:
        self.temp = Path(tempfile.mkdtemp(prefix="rh", dir="/tmp"))  # short: Ray's socket paths must fit
        self.dashboard_port, self.gcs_port = free_port(), free_port()
        self.address = f"http://127.0.0.1:{self.dashboard_port}"
        self.log = open(self.temp / "head.log", "w")  # noqa: SIM115 - the head writes to it until stop()
        self.process = subprocess.Popen(
            [str(Path(sys.executable).parent / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
             f"--port={self.gcs_port}", "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard_port}",
             "--include-dashboard=true", "--num-cpus=2", f"--temp-dir={self.temp}", "--disable-usage-stats",
             *(f"--{name}={free_port()}" for name in PORT_OPTIONS)],
            env=env, start_new_session=True, stdout=self.log, stderr=subprocess.STDOUT,
        )  # fmt: skip

    def wait_until_up(self, env: dict[str, str]) -> None:
        probe = [*CLI, "jobs", "status", "no-such-job", "--address", self.address]
        deadline = time.monotonic() + 300
        while True:
            result = subprocess.run(probe, cwd=ROOT, env=env, capture_output=True, text=True)
            if "does not exist" in result.stderr:  # the job server answered, token accepted
                return
            if time.monotonic() > deadline or self.process.poll() is not None:
                self.stop()
                pytest.fail(
                    f"the Ray head did not start:\n{result.stderr}\n{(self.temp / 'head.log').read_text()[-3000:]}"
                )
            time.sleep(2)

    def stop(self) -> None:
        """SIGTERM to the whole process group, SIGKILL to what is left after 10 s. The group, not the
        ``ray start`` process alone: that process can exit (when one of its children dies) and leave
        the GCS and the raylet running."""
        group = self.process.pid
        with contextlib.suppress(ProcessLookupError):
            os.killpg(group, signal.SIGTERM)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                self.process.poll()  # reap the leader, so that an exited one does not count
                os.killpg(group, 0)  # raises once no process of the group is left
                time.sleep(0.5)
            os.killpg(group, signal.SIGKILL)
        self.process.wait()
        self.log.close()


@pytest.fixture(scope="module")
def user_home(tmp_path_factory) -> Path:
    """A HOME whose ~/.ray/auth_token exists, as after any local ray.init()."""
    home = tmp_path_factory.mktemp("home")
    (home / ".ray").mkdir()
    (home / ".ray" / "auth_token").write_text(secrets.token_hex(32))
    return home


@pytest.fixture(scope="module")
def ray_head(user_home):
    env = user_environment(user_home)
    head = Head(env)
    head.wait_until_up(env)
    yield head, env
    head.stop()


def write_rows(path: Path, count: int) -> Path:
    words = ["French", "German", "capitals", "Spanish", "one sentence", "Italian"]
    rows = [{"id": f"row-{i}", "prompt": f"Name a color. Answer in {words[i % 6]}.",
             "instruction": f"Answer in {words[i % 6]}."} for i in range(count)]  # fmt: skip
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def cli(*arguments: str, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *arguments], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def test_submit_to_a_head_with_token_auth_turned_on_by_its_token_file(ray_head, tmp_path):
    head, env = ray_head
    address = head.address
    assert "RAY_AUTH_MODE" not in env and "RAY_AUTH_TOKEN" not in env
    output = tmp_path / "out"
    inputs = write_rows(tmp_path / "in.jsonl", 3)
    result = cli(
        "submit", "--address", address, "--wait", "--",
        "generate", str(inputs), "--output", str(output), "--max-new-tokens", "4", "--examples", "0",
        env=env, timeout=900,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    job_id = result.stdout.strip().splitlines()[0]
    assert "SUCCEEDED" in result.stderr
    table = pads.dataset(str(output / "data"), format="parquet").to_table().to_pylist()
    assert sorted(r["id"] for r in table) == ["row-0", "row-1", "row-2"]
    assert all(r["status"] == "ok" for r in table)
    assert cli("jobs", "status", job_id, "--address", address, env=env).stdout.strip() == "SUCCEEDED"
    assert "3 written (3 ok, 0 error)" in cli("jobs", "logs", job_id, "--address", address, env=env).stdout


def test_a_copy_installed_from_the_wheel_sends_its_packages_not_site_packages(ray_head, tmp_path):
    """Installed (not a checkout), the folder above ``jobs/`` is site-packages: the job gets the three
    packages as ``py_modules`` (no working directory) and runs."""
    source = tmp_path / "source"  # built from a copy: setuptools writes build/ and *.egg-info/ beside the sources
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source)
    for name in ("directer", "pipeline", "jobs"):
        shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "dist"),
         str(source)], capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert built.returncode == 0, built.stderr
    site = tmp_path / "site-packages"
    (wheel,) = (tmp_path / "dist").glob("directer-*.whl")
    installed = subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert installed.returncode == 0, installed.stderr
    head, env = ray_head
    env = {**env, "PYTHONPATH": str(site)}
    rows = tmp_path / "rows.jsonl"
    result = subprocess.run(
        [*CLI, "submit", "--address", head.address, "--wait", "--", "ifeval", "--output", str(rows), "--limit", "3"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert len(rows.read_text().splitlines()) == 3
    job_id = result.stdout.strip().splitlines()[0]
    info = f"client({head.address!r}).get_job_info({job_id!r})"
    script = f"from jobs.submit import client; print(sorted({info}.runtime_env))"
    keys = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert keys.returncode == 0, keys.stderr
    assert "'py_modules'" in keys.stdout and "'working_dir'" not in keys.stdout, keys.stdout


def test_generate_joins_the_head_by_its_address_with_the_token(ray_head, tmp_path):
    head, env = ray_head
    inputs = write_rows(tmp_path / "in.jsonl", 2)
    result = cli("generate", str(inputs), "--output", str(tmp_path / "out"), "--address", f"127.0.0.1:{head.gcs_port}",
                 "--max-new-tokens", "3", "--examples", "0", env=env, timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 written (2 ok, 0 error)" in result.stdout


def test_a_client_without_the_token_is_told_how_to_get_one(ray_head, tmp_path):
    address = ray_head[0].address
    result = cli("jobs", "status", "any", "--address", address, env=user_environment(tmp_path))
    assert result.returncode == 2
    assert "requires a token and none was found" in result.stderr
    assert "ray get-auth-token" in result.stderr and "Traceback" not in result.stderr
    wrong = {**user_environment(tmp_path), "RAY_AUTH_TOKEN": "not-the-token"}
    refused = cli("jobs", "status", "any", "--address", address, env=wrong)
    assert refused.returncode == 2 and "refused the token from RAY_AUTH_TOKEN" in refused.stderr


def test_signals_detach_from_a_job_that_keeps_running(ray_head, tmp_path):
    head, env = ray_head
    address = head.address
    inputs = write_rows(tmp_path / "in.jsonl", 6)
    command = [*CLI, "submit", "--address", address, "--wait", "--", "generate", str(inputs), "--output",
               str(tmp_path / "out"), "--max-new-tokens", "200", "--batch-size", "1", "--examples", "0"]  # fmt: skip
    waiting = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    job_id = waiting.stdout.readline().strip()
    assert job_id, waiting.stderr.read()
    time.sleep(3)
    waiting.send_signal(signal.SIGTERM)
    _, stderr = waiting.communicate(timeout=15)
    assert waiting.returncode == 128 + signal.SIGTERM, stderr
    assert f"directer jobs stop {job_id} --address {address}" in stderr
    assert cli("jobs", "status", job_id, "--address", address, env=env).stdout.strip() in ("PENDING", "RUNNING")

    following = subprocess.Popen(
        [*CLI, "jobs", "logs", job_id, "--follow", "--address", address],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert following.stdout.readline(), "no log line came"  # following: the job server answered
    following.send_signal(signal.SIGINT)
    _, stderr = following.communicate(timeout=15)
    assert following.returncode == 128 + signal.SIGINT, stderr
    assert "keeps running" in stderr
    assert cli("jobs", "stop", job_id, "--address", address, env=env).stdout.strip() == "stopped"


def test_waiting_gives_up_when_the_cluster_goes_away(user_home, tmp_path):
    env = user_environment(user_home)
    head = Head(env)
    try:
        head.wait_until_up(env)
        inputs = write_rows(tmp_path / "in.jsonl", 6)
        submitted = cli("submit", "--address", head.address, "--", "generate", str(inputs), "--output",
                        str(tmp_path / "out"), "--max-new-tokens", "200", env=env)  # fmt: skip
        job_id = submitted.stdout.strip()
        assert submitted.returncode == 0 and job_id, submitted.stderr
        follow = subprocess.Popen(
            [*CLI, "jobs", "logs", job_id, "--follow", "--address", head.address, "--unreachable-timeout", "5"],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert follow.stdout.readline(), "no log line came"  # following: the job server answered
    finally:
        head.stop()
    gone = time.monotonic()
    _, stderr = follow.communicate(timeout=90)
    assert follow.returncode == 2, stderr
    assert "has not answered for 5 s" in stderr and f"directer jobs status {job_id}" in stderr
    assert time.monotonic() - gone < 60


def test_an_address_where_nothing_answers_fails_within_the_bound(tmp_path):
    inputs = write_rows(tmp_path / "in.jsonl", 1)
    started = time.monotonic()
    result = cli("generate", str(inputs), "--output", str(tmp_path / "out"), "--address", f"127.0.0.1:{free_port()}",
                 "--connect-timeout", "3", env=user_environment(tmp_path), timeout=300)  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert "no Ray cluster answered at 127.0.0.1:" in result.stderr and "within 3 s" in result.stderr
    assert time.monotonic() - started < 120
    dashboard = cli("generate", str(inputs), "--output", str(tmp_path / "out"), "--address", "http://127.0.0.1:8265",
                    env=user_environment(tmp_path))  # fmt: skip
    assert dashboard.returncode == 2 and "is a dashboard address" in dashboard.stderr
    server = cli("submit", "--address", f"http://127.0.0.1:{free_port()}", "--wait", "--", "bench",
                 env=user_environment(tmp_path))  # fmt: skip
    assert server.returncode == 2 and "no Ray job server answered at" in server.stderr
