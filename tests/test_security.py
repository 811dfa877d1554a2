"""Secrets in the environment never reach outputs, manifests, reports or what the commands print."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_a_planted_token_appears_in_no_output_manifest_report_or_log(tmp_path):
    secret = f"hf_planted{uuid.uuid4().hex}"
    env = {**os.environ, "HF_TOKEN": secret, "HUGGING_FACE_HUB_TOKEN": secret, "AWS_SECRET_ACCESS_KEY": secret}
    source = tmp_path / "rows.jsonl"
    rows = [{"id": "a", "prompt": "Name a fruit. Answer in French.", "instruction": "Answer in French."},
            {"id": "b", "prompt": "Name a tree."}]  # fmt: skip
    source.write_text("".join(json.dumps(row) + "\n" for row in rows))
    commands = [
        ["generate", str(source), "--output", str(tmp_path / "run"), "--max-new-tokens", "4"],
        ["eval", "ifeval", "--methods", "zero-shot,directer", "--limit", "2", "--max-new-tokens", "4",
         "--output", str(tmp_path / "eval")],
        ["export", str(tmp_path / "run"), "--output", str(tmp_path / "train"), "--format", "jsonl"],
    ]  # fmt: skip
    printed = []
    for command in commands:
        result = subprocess.run([sys.executable, "-m", "jobs.cli", *command], cwd=ROOT, env=env,
                                capture_output=True, text=True, timeout=900)  # fmt: skip
        assert result.returncode == 0, result.stderr[-2000:]
        printed.append(result.stdout + result.stderr)
    written = [path for path in tmp_path.rglob("*") if path.is_file() and path != source]
    assert any(path.name == "run.json" for path in written) and any(path.suffix == ".parquet" for path in written)
    assert (tmp_path / "eval" / "report.html").is_file() and any((tmp_path / "train").iterdir())
    leaked = [str(path) for path in written if secret.encode() in path.read_bytes()]
    assert not leaked and all(secret not in text for text in printed)


LOCAL_RAY = """
import ray
from pipeline.cluster import init_ray
init_ray(None)
print(ray.get_runtime_context().gcs_address, flush=True)
input()
"""


def test_the_local_ray_a_run_starts_refuses_clients_without_its_token(tmp_path):
    """Ray 2.60 binds its servers on every interface whatever ``_node_ip_address`` says (measured; the
    README's Reliability section), so what keeps others out of a local run's Ray is its token."""
    import grpc
    from ray.core.generated.gcs_service_pb2 import GetAllNodeInfoRequest
    from ray.core.generated.gcs_service_pb2_grpc import NodeInfoGcsServiceStub
    from test_local_ray import local_environment

    env = local_environment(tmp_path)
    local = subprocess.Popen([sys.executable, "-c", LOCAL_RAY], cwd=ROOT, env=env, stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True, start_new_session=True)  # fmt: skip
    try:
        address = local.stdout.readline().strip()
        token = (tmp_path / ".ray" / "auth_token").read_text().strip()
        with grpc.insecure_channel(address) as channel:
            nodes = NodeInfoGcsServiceStub(channel)
            with pytest.raises(grpc.RpcError) as refused:
                nodes.GetAllNodeInfo(GetAllNodeInfoRequest(), timeout=30)
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
            reply = nodes.GetAllNodeInfo(GetAllNodeInfoRequest(), timeout=30,
                                         metadata=[("authorization", f"Bearer {token}")])  # fmt: skip
            assert len(reply.node_info_list) == 1
    finally:
        os.killpg(local.pid, signal.SIGKILL)
        local.wait()
