"""Running ``directer`` commands as Ray jobs through Ray's Job Submission API.

The job's entrypoint is the same command line a user types locally (``python -m jobs.cli generate
...``), run on the cluster with this project as its working directory; inside the job ``ray.init()``
joins the cluster, so ``generate``, ``eval`` and ``bench`` run unchanged. With Ray's token
authentication, the client reads the token where Ray does: ``RAY_AUTH_TOKEN``, the file named by
``RAY_AUTH_TOKEN_PATH``, or the default token file that ``ray get-auth-token`` shows.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import sys
import time
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_ADDRESS = "http://127.0.0.1:8265"
# never uploaded with the working directory
EXCLUDES = [".venv/", ".git/", "runs/", "**/__pycache__/", ".pytest_cache/", ".ruff_cache/", "*.egg-info/"]
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}
AGENT_WAIT_SECONDS = 120


def client(address: str | None = None):
    """A Job Submission client for ``address`` (default ``$RAY_ADDRESS``, else the local dashboard)."""
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(address or os.environ.get("RAY_ADDRESS") or DEFAULT_ADDRESS)


def entrypoint(arguments: list[str]) -> str:
    """The shell command the job runs: this project's command line with ``arguments``."""
    return shlex.join(["python", "-m", "jobs.cli", *arguments])


def submit(
    arguments: list[str],
    address: str | None = None,
    env: dict[str, str] | None = None,
    pip: list[str] | None = None,
) -> str:
    """Submit ``directer ARGUMENTS`` as a Ray job; returns its id."""
    if not arguments:
        raise ValueError("give the directer command to run after --, e.g. -- generate data/ --output /shared/out")
    runtime_env: dict[str, object] = {"working_dir": str(PROJECT_ROOT), "excludes": EXCLUDES}
    variables = {"HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "0"), **(env or {})}
    runtime_env["env_vars"] = variables
    if pip:
        runtime_env["pip"] = pip
    jobs = client(address)
    deadline = time.monotonic() + AGENT_WAIT_SECONDS
    while True:
        try:
            return jobs.submit_job(entrypoint=entrypoint(arguments), runtime_env=runtime_env)
        except RuntimeError as error:
            # a cluster that has just started answers before its job agent is up
            if "No available agent" not in str(error) or time.monotonic() > deadline:
                raise
            time.sleep(2)


def wait(job_id: str, address: str | None = None, timeout: float | None = None, poll: float = 1.0) -> str:
    """Block until the job ends (or ``timeout`` seconds pass); returns its status."""
    jobs = client(address)
    started = time.monotonic()
    while True:
        status = str(jobs.get_job_status(job_id).value)
        if status in TERMINAL or (timeout is not None and time.monotonic() - started > timeout):
            return status
        time.sleep(poll)


def follow(job_id: str, address: str | None = None) -> str:
    """Stream the job's logs to stdout until it ends; returns its status."""
    jobs = client(address)

    async def tail() -> None:
        async for lines in jobs.tail_job_logs(job_id):
            sys.stdout.write(lines)
            sys.stdout.flush()

    asyncio.run(tail())
    return wait(job_id, address)


def status(job_id: str, address: str | None = None) -> str:
    return str(client(address).get_job_status(job_id).value)


def logs(job_id: str, address: str | None = None) -> str:
    return client(address).get_job_logs(job_id)


def stop(job_id: str, address: str | None = None) -> bool:
    return client(address).stop_job(job_id)
