"""Starting or joining Ray: an embedded local Ray, or a cluster by address, within a bounded wait.

Two traps a plain ``ray.init()`` sets for a user (both met on Ray 2.60):

- without an address it joins the cluster named in Ray's temp folder (``ray_current_cluster``, left
  by ``ray start``), even when that head was killed long ago, and then retries for many minutes;
  so without ``--address`` and ``$RAY_ADDRESS`` we always start a local Ray (``address="local"``).
  A Ray job keeps working: its driver finds its cluster in ``$RAY_ADDRESS``;
- given an address where nothing answers, it retries for many minutes in native code that ignores
  SIGTERM; so we first wait, within ``connect_timeout``, for a gRPC server to answer there.

Token authentication: a head started by ``ray start --head`` turns it on whenever a token exists
(``~/.ray/auth_token`` is written by any local ``ray.init()``), while a client sends its token only
with ``RAY_AUTH_MODE=token``. When that variable is unset and a token can be found where Ray keeps
it, joining a cluster sends it (a cluster without authentication ignores it).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

AUTH_MODE = "RAY_AUTH_MODE"
NODE_ID_LABEL = "ray.io/node-id"  # a label Ray gives every node
TOKEN_HELP = (
    "copy the cluster's token (`ray get-auth-token` on the head) to ~/.ray/auth_token, "
    "or set RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH"
)


class ClusterError(RuntimeError):
    """Ray could not give a run what it needs (a cluster that answers, actors that start); the message
    says what was tried and what to do."""


def find_token() -> tuple[str, str] | None:
    """The cluster token where Ray looks for it: ``$RAY_AUTH_TOKEN``, the file named by
    ``$RAY_AUTH_TOKEN_PATH``, then ``~/.ray/auth_token``; returns ``(token, where it was found)``."""
    if token := os.environ.get("RAY_AUTH_TOKEN", "").strip():
        return token, "RAY_AUTH_TOKEN"
    candidates = []
    if named := os.environ.get("RAY_AUTH_TOKEN_PATH"):
        candidates.append(Path(named).expanduser())
    candidates.append(Path.home() / ".ray" / "auth_token")
    for path in candidates:
        if path.is_file() and (token := path.read_text().strip()):
            return token, str(path)
    return None


def gcs_endpoint(address: str) -> tuple[str, int] | None:
    """``(host, port)`` of a cluster address (``host:port`` or ``ray://host:port``); None for ``auto``."""
    if address in ("auto", "local"):
        return None
    if address.startswith(("http://", "https://")):
        raise ClusterError(
            f"{address} is a dashboard address (what `directer submit` takes); to join a cluster give its GCS "
            "address, host:6379 (`ray start --head` prints it), or submit the command as a job"
        )
    parsed = urlparse(address if "://" in address else f"ray://{address}")
    if not parsed.hostname or not parsed.port:
        raise ClusterError(f"cluster address {address!r} is not host:port (e.g. 10.0.0.5:6379)")
    return parsed.hostname, parsed.port


def wait_for_cluster(address: str, timeout: float) -> None:
    """Return once a gRPC server (a Ray head) answers at ``address``; raise after ``timeout`` seconds."""
    import grpc

    endpoint = gcs_endpoint(address)
    if endpoint is None or os.environ.get("RAY_USE_TLS", "0").lower() in ("1", "true"):
        return  # nothing to probe, or a TLS handshake this plain probe cannot make
    host, port = endpoint
    with grpc.insecure_channel(f"{host}:{port}") as channel:
        try:
            grpc.channel_ready_future(channel).result(timeout=timeout)
        except grpc.FutureTimeoutError:
            raise ClusterError(
                f"no Ray cluster answered at {address} within {timeout:.0f} s: check that its head is running "
                f"(`ray status --address {host}:{port}`) and that this is its GCS address (port 6379 by default); "
                "without an address (and without $RAY_ADDRESS) directer starts a local Ray; "
                "--connect-timeout sets how long to wait"
            ) from None


def init_ray(address: str | None, connect_timeout: float = 60.0, ray_logs: bool = False) -> None:
    """Join the cluster at ``address`` or ``$RAY_ADDRESS``, else start a local Ray. Without ``ray_logs``
    only Ray's warnings and errors reach the screen (not its INFO lines, nor the workers' own output)."""
    import ray

    if ray.is_initialized():
        return
    logs = {"log_to_driver": ray_logs, "logging_level": logging.INFO if ray_logs else logging.WARNING}
    if not ray_logs:  # Ray's notice that token authentication is on for a local Ray, as it should be
        logging.getLogger("ray._private.authentication").setLevel(logging.ERROR)
    address = address or os.environ.get("RAY_ADDRESS") or None
    main_thread = threading.current_thread() is threading.main_thread()
    caller_handler = signal.getsignal(signal.SIGTERM) if main_thread else None
    if address:
        wait_for_cluster(address, connect_timeout)
        if AUTH_MODE not in os.environ and find_token():
            _send_token()
        try:
            ray.init(address=address, **logs)
        except ConnectionError as error:
            raise ClusterError(
                f"could not join the Ray cluster at {address}: {error}; if it uses token authentication, {TOKEN_HELP}"
            ) from None
    else:
        ray.init(address="local", include_dashboard=False, **logs)
    if caller_handler is not None:
        # ray.init replaces the SIGTERM handler with sys.exit; keep the caller's (the CLI stops cleanly)
        signal.signal(signal.SIGTERM, caller_handler)


def _send_token() -> None:
    """Token mode for this process, as ``ray start`` turns it on when a token exists (Ray reads the
    mode into its cached config at import, so setting the variable alone is not enough)."""
    from ray._raylet import Config

    os.environ[AUTH_MODE] = "token"
    Config.initialize("")


def on_this_node() -> dict[str, object]:
    """Ray remote arguments that keep a task on this process's node. The run's input and output paths are
    this machine's (the head's, for a submitted job): the tasks that read the inputs and write the
    output rows run here, and only the rows travel to and from the model actors on other nodes (Ray
    Data spreads tasks over every node by default, where those paths name another disk or nothing).
    A label selector on the node's id, a label every Ray node has: Ray Data 2.60 takes it by name for
    reads, where it deprecates a scheduling strategy in ``ray_remote_args``."""
    import ray

    return {"label_selector": {NODE_ID_LABEL: ray.get_runtime_context().get_node_id()}}


def largest_node_cpus() -> float:
    """The CPUs of the cluster's largest live node: an actor's torch threads share one node's cores, so
    the cluster's total over-counts them on several nodes."""
    import ray

    return max((node["Resources"].get("CPU", 0.0) for node in ray.nodes() if node["Alive"]), default=1.0)


def describe_resources(resources: dict[str, float]) -> str:
    """``CPU 2, GPU 0``, plus any accelerator types the cluster names."""
    shown = {"CPU": resources.get("CPU", 0.0), "GPU": resources.get("GPU", 0.0)}
    shown.update({name: value for name, value in resources.items() if name.startswith("accelerator_type:")})
    return ", ".join(f"{name} {value:g}" for name, value in shown.items())


def actor_start_error(cpus: float, gpus: float, actors: int, timeout: float) -> ClusterError:
    """The error for an actor pool that did not start within ``timeout`` seconds."""
    import ray

    return ClusterError(
        f"no model actor started within {timeout:.0f} s: each of {actors} actor(s) asks for "
        f"{cpus:g} CPU and {gpus:g} GPU, and the cluster has {describe_resources(ray.cluster_resources())}. "
        "Lower --gpus-per-actor or --actors, add nodes, or, on an autoscaling cluster still starting its GPU nodes "
        "or loading a large model, raise --actor-start-timeout"
    )


# Ray Data passes its actors' constructor arguments by reference and restarts dead actors (which a long
# run wants), so Ray's core worker logs this error, on stderr and in the driver's log file, for every
# actor it starts: https://github.com/ray-project/ray/issues/53727. The only switch,
# RAY_BACKEND_LOG_LEVEL, would hide every native error and prints a line of its own.
RESTART_WARNING = b"has constructor arguments in the object store and max_restarts > 0"


@contextlib.contextmanager
def hide_native_lines(*patterns: bytes) -> Iterator[None]:
    """While inside, drop the lines written to file descriptor 2 that contain one of ``patterns``.

    Native code (Ray's core worker) writes there directly, past Python's ``sys.stderr``. Everything
    else passes through as it comes: a partial line (a progress bar's ``\\r`` update) is held back only
    while it could still become a native log line (``[time level pid] file:line: ...``).
    """
    sys.stderr.flush()
    screen = os.dup(2)
    read_end, write_end = os.pipe()
    os.dup2(write_end, 2)
    os.close(write_end)

    def forward() -> None:
        pending = b""
        with contextlib.suppress(OSError), open(screen, "wb", buffering=0, closefd=False) as out:
            while chunk := os.read(read_end, 65536):
                *lines, pending = (pending + chunk).split(b"\n")
                kept = b"".join(line + b"\n" for line in lines if not any(p in line for p in patterns))
                if pending and not pending.startswith(b"["):
                    kept, pending = kept + pending, b""
                while kept:
                    kept = kept[out.write(kept) :]
            out.write(pending)

    thread = threading.Thread(target=forward, name="hide-native-lines", daemon=True)
    thread.start()
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(screen, 2)  # closes the pipe's last writer: the thread reads its end and stops
        thread.join(timeout=5)
        os.close(screen)
        os.close(read_end)
