"""Starting and stopping the local servers and workers of the integration tests (loopback only),
and killing a process tree we started, by its ids."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_healthy(url: str, process: subprocess.Popen, timeout: float = 300) -> None:
    """Wait until GET `url` answers 200, failing early if `process` (the server) exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, f"the server for {url} exited with {process.returncode}"
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(1)
    raise TimeoutError(f"{url} not healthy after {timeout}s")


def stop(process: subprocess.Popen) -> None:
    """Stop a process we started with `start_new_session=True`, and its children: by its process group,
    then by pid the descendants that left the group (`mlflow server` starts its job consumers that way)."""
    if process.poll() is None:
        below = descendants(process.pid)
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        for pid in below:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (children, grandchildren …), from /proc."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents[int(stat.parent.name)] = int(fields[1])
    found, frontier = [], [pid]
    while frontier:
        children = [child for child, parent in parents.items() if parent in frontier]
        found += children
        frontier = children
    return found


def kill_tree(process: subprocess.Popen) -> list[int]:
    """SIGKILL a process we started and everything below it, as a dead machine would; returns the pids."""
    pids = [process.pid, *descendants(process.pid)]
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    process.wait()
    return pids


S3_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


def start_s3(log_path: Path, bucket: str) -> tuple[subprocess.Popen, dict[str, str]]:
    """A moto S3 server on loopback holding an empty `bucket`, and the environment that points boto
    (so s3fs) at it: what a MinIO or S3 user sets with AWS_ENDPOINT_URL_S3 and credentials."""
    import sys

    import boto3

    port = free_port()
    env = {**S3_CREDENTIALS, "AWS_ENDPOINT_URL_S3": f"http://127.0.0.1:{port}"}
    with open(log_path, "w") as log:
        server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], stdout=log,
                                  stderr=subprocess.STDOUT, start_new_session=True)
    wait_healthy(f"{env['AWS_ENDPOINT_URL_S3']}/moto-api/", server, timeout=60)
    boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL_S3"], aws_access_key_id="testing", aws_secret_access_key="testing",
                 region_name="us-east-1").create_bucket(Bucket=bucket)
    return server, env
