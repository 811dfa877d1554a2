"""Running ``directer`` commands as Ray jobs through Ray's Job Submission API.

The job's entrypoint is the same command line a user types locally (``python -m jobs.cli generate
...``), run on the cluster with this code (:func:`code_env`); inside the job ``ray.init()`` joins the
cluster, so ``generate``, ``eval`` and ``bench`` run unchanged.

Token authentication: when the job server answers 401, the client reads the token where Ray does
(``RAY_AUTH_TOKEN``, the file named by ``RAY_AUTH_TOKEN_PATH``, ``~/.ray/auth_token``) and sends it;
Ray's own client sends it only with ``RAY_AUTH_MODE=token``, which a head started by ``ray start
--head`` does not need to turn authentication on. Every request gives up after ``REQUEST_TIMEOUT``
seconds (Ray's client waits forever), and waiting on a job gives up once its job server has not
answered for ``unreachable_timeout`` seconds.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import sys
import threading
import time
from pathlib import Path

import requests
from ray.exceptions import AuthenticationError
from ray.job_submission import JobSubmissionClient

from pipeline.cluster import TOKEN_HELP, find_token

PROJECT_ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("directer", "pipeline", "jobs")
DEFAULT_ADDRESS = "http://127.0.0.1:8265"
# never uploaded with the code
EXCLUDES = [".venv/", ".git/", "runs/", "**/__pycache__/", ".pytest_cache/", ".ruff_cache/", "*.egg-info/"]
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}
AGENT_WAIT_SECONDS = 120
REQUEST_TIMEOUT = 30.0
UNREACHABLE_TIMEOUT = 120.0
# what a job server that does not answer raises (Ray turns some into the built-in ConnectionError)
UNREACHABLE = (ConnectionError, requests.exceptions.RequestException)


class JobServerError(RuntimeError):
    """The job server could not be reached, refused the request, or does not know the job; the message
    says what was tried and what to do."""


class _BoundedClient(JobSubmissionClient):
    """Ray's client with a bound on every request (it sets none, so a silent server blocks forever)."""

    def _do_request(self, method: str, endpoint: str, **kwargs):
        kwargs.setdefault("timeout", REQUEST_TIMEOUT)
        return super()._do_request(method, endpoint, **kwargs)


def job_server_address(address: str | None = None) -> str:
    """``address``, else ``$RAY_ADDRESS``, else the local dashboard."""
    return address or os.environ.get("RAY_ADDRESS") or DEFAULT_ADDRESS


def client(address: str | None = None) -> JobSubmissionClient:
    """A Job Submission client for the job server at ``address``, with the cluster's token when it asks."""
    address = job_server_address(address)
    try:
        return _BoundedClient(address)
    except AuthenticationError:
        pass  # the server asks for a token
    except UNREACHABLE as error:
        raise JobServerError(
            f"no Ray job server answered at {address} ({_first_line(error)}): start a head (`ray start --head`), "
            "forward a cluster's dashboard (`ray dashboard cluster.yaml`, or `kubectl port-forward` on KubeRay), "
            "or pass --address"
        ) from None
    found = find_token()
    if found is None:
        raise JobServerError(f"the Ray job server at {address} requires a token and none was found: {TOKEN_HELP}")
    token, where = found
    try:
        return _BoundedClient(address, headers={"Authorization": f"Bearer {token}"})
    except AuthenticationError:
        raise JobServerError(f"the Ray job server at {address} refused the token from {where}: {TOKEN_HELP}") from None


def _no_answer(address: str | None, error: BaseException) -> JobServerError:
    return JobServerError(f"the job server at {job_server_address(address)} did not answer: {_first_line(error)}")


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def entrypoint(arguments: list[str]) -> str:
    """The shell command the job runs: this project's command line with ``arguments``."""
    return shlex.join(["python", "-m", "jobs.cli", *arguments])


def code_env(root: Path = PROJECT_ROOT) -> dict[str, object]:
    """How the job gets this code. A source checkout travels whole as the job's working directory, so
    the README's relative paths (``examples/...``) resolve there too. An installed copy's ``root`` is
    site-packages (2.4 GB with torch: Ray would zip it all, then refuse a package over 512 MiB), so
    only its three packages travel, as ``py_modules``; paths then must be ones the cluster sees."""
    if (root / "pyproject.toml").is_file() and (root / "jobs" / "cli.py").is_file():
        return {"working_dir": str(root), "excludes": EXCLUDES}
    return {"py_modules": [str(root / name) for name in PACKAGES], "excludes": EXCLUDES}


def submit(
    arguments: list[str],
    address: str | None = None,
    env: dict[str, str] | None = None,
    pip: list[str] | None = None,
) -> str:
    """Submit ``directer ARGUMENTS`` as a Ray job; returns its id."""
    if not arguments:
        raise ValueError("give the directer command to run after --, e.g. -- generate data/ --output /shared/out")
    runtime_env = code_env()
    # the submitter's hub setting when it has one; else the cluster's own (its nodes' environment) stands
    offline = os.environ.get("HF_HUB_OFFLINE")
    variables = {**({"HF_HUB_OFFLINE": offline} if offline is not None else {}), **(env or {})}
    runtime_env["env_vars"] = variables
    if pip:
        runtime_env["pip"] = pip
    jobs = client(address)
    deadline = time.monotonic() + AGENT_WAIT_SECONDS
    while True:
        try:
            return jobs.submit_job(entrypoint=entrypoint(arguments), runtime_env=runtime_env)
        except UNREACHABLE as error:
            raise _no_answer(address, error) from None
        except RuntimeError as error:
            # a cluster that has just started answers before its job agent is up
            if "No available agent" not in str(error) or time.monotonic() > deadline:
                raise JobServerError(f"the job server refused the job: {_first_line(error)}") from None
            time.sleep(2)


def wait(
    job_id: str,
    address: str | None = None,
    unreachable_timeout: float = UNREACHABLE_TIMEOUT,
    poll: float = 1.0,
) -> str:
    """Block until the job ends; returns its status. A job server that stops answering is retried for
    ``unreachable_timeout`` seconds (a restarting dashboard, a dropped port-forward), then given up on."""
    jobs = client(address)
    last_answer = time.monotonic()
    while True:
        try:
            status = str(jobs.get_job_status(job_id).value)
            last_answer = time.monotonic()
        except UNREACHABLE as error:
            if time.monotonic() - last_answer > unreachable_timeout:
                where = job_server_address(address)
                raise JobServerError(
                    f"the job server at {where} has not answered for {unreachable_timeout:.0f} s "
                    f"({_first_line(error)}); job {job_id} may still be running on its cluster: "
                    f"`directer jobs status {job_id} --address {where}` once it answers again"
                ) from None
            status = ""
        except RuntimeError as error:
            raise JobServerError(f"job {job_id}: {_first_line(error)}") from None
        if status in TERMINAL:
            return status
        time.sleep(poll)


def follow(job_id: str, address: str | None = None, unreachable_timeout: float = UNREACHABLE_TIMEOUT) -> str:
    """Stream the job's logs to stdout until it ends; returns its status.

    The logs stream in a thread while this one polls the job's status, so a cluster that goes away
    mid-stream (a socket that never closes) still ends the wait within ``unreachable_timeout``.
    """
    jobs = client(address)

    async def tail() -> None:
        async for lines in jobs.tail_job_logs(job_id):
            sys.stdout.write(lines)
            sys.stdout.flush()

    def stream() -> None:
        try:
            asyncio.run(tail())
        except Exception:  # the status poll below reports what went wrong
            return

    streamer = threading.Thread(target=stream, name=f"logs-{job_id}", daemon=True)
    streamer.start()
    final = wait(job_id, address, unreachable_timeout)
    streamer.join(timeout=10)  # the last lines of a finished job
    return final


def status(job_id: str, address: str | None = None) -> str:
    return _ask(job_id, address, lambda jobs: str(jobs.get_job_status(job_id).value))


def logs(job_id: str, address: str | None = None) -> str:
    return _ask(job_id, address, lambda jobs: jobs.get_job_logs(job_id))


def stop(job_id: str, address: str | None = None) -> bool:
    return _ask(job_id, address, lambda jobs: jobs.stop_job(job_id))


def _ask(job_id: str, address: str | None, request):
    """One request about a job, its failures as one-line :class:`JobServerError`."""
    jobs = client(address)
    try:
        return request(jobs)
    except UNREACHABLE as error:
        raise _no_answer(address, error) from None
    except RuntimeError as error:  # Ray's client: "Request failed with status code 404: Job ... does not exist"
        raise JobServerError(f"job {job_id}: {_first_line(error)}") from None
