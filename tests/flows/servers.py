"""Starting and stopping the local servers and workers of the integration tests and the scale-out
benchmark (loopback only), and killing a process tree we started, by its ids."""

from __future__ import annotations

import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import yaml

ROOT = Path(__file__).parents[2]
PREFECT = [sys.executable, "-m", "prefect"]


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


def postgres_bin() -> Path:
    """The directory of the PostgreSQL server binaries: Debian's package puts them under
    /usr/lib/postgresql/<version>/bin (not on PATH); elsewhere `initdb` on PATH."""
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parts[-3]) if p.parts[-3].isdigit() else 0)
    if versions:
        return versions[-1].parent
    found = shutil.which("initdb")
    if found is None:
        raise RuntimeError("PostgreSQL is not installed: no /usr/lib/postgresql/*/bin/initdb and no initdb on PATH "
                           "(bash scripts/setup.sh installs the Debian package `postgresql` when run as root)")
    return Path(found).resolve().parent


class Postgres:
    """A throwaway PostgreSQL cluster (in `root`, or as root in its own temp directory) on 127.0.0.1 (trust authentication, loopback only) with
    one database, for the Prefect server as the README deploys it. initdb refuses to run as root, so as
    root the cluster belongs to the `postgres` user of the Debian package. Every failure raises with
    the command's output: the test then fails with the reason."""

    def __init__(self, root: Path, database: str = "prefect"):
        self.bin, self.data, self.port, self.database = postgres_bin(), root / "pgdata", free_port(), database
        self.log = root / "postgres.log"
        self.user = None  # run as ourselves
        if os.geteuid() == 0:
            try:
                self.user = pwd.getpwnam("postgres")
            except KeyError:
                raise RuntimeError("running as root and there is no `postgres` user to own the cluster") from None
        self.role = self.user.pw_name if self.user else pwd.getpwuid(os.geteuid()).pw_name
        self.url = f"postgresql+asyncpg://{self.role}@127.0.0.1:{self.port}/{database}"

    def _run(self, *args: str, timeout: float = 120) -> None:
        command = [str(self.bin / args[0]), *args[1:]]
        if self.user:
            command = ["runuser", "-u", self.user.pw_name, "--", *command]
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
        if done.returncode != 0:
            log = self.log.read_text() if self.log.exists() else ""
            raise RuntimeError(f"PostgreSQL: {' '.join(command)} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}\n{log}")

    def start(self) -> str:
        """initdb, pg_ctl start, createdb; returns the SQLAlchemy URL Prefect takes."""
        if self.user:
            # the postgres user cannot enter root's 0700 pytest directories: the cluster lives in its own
            # directory under the system temp dir, owned by that user, and is deleted by `stop`
            self.data = Path(tempfile.mkdtemp(prefix="csd-asset-pg-"))
            self.log = self.data.with_name(self.data.name + ".log")
            self.log.touch()
            for path in (self.data, self.log):
                os.chown(path, self.user.pw_uid, self.user.pw_gid)
        self._run("initdb", "-D", str(self.data), "-A", "trust", "-U", self.role, "-E", "UTF8", "--no-sync")
        # loopback only, no Unix socket in /var/run (another cluster may own it), fsync off: a test database
        options = f"-h 127.0.0.1 -p {self.port} -k {self.data} -c fsync=off -c max_connections=200"
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-o", options, "-w", "-t", "60", "start")
        self._run("createdb", "-h", "127.0.0.1", "-p", str(self.port), "-U", self.role, self.database)
        return self.url

    def stop(self) -> None:
        if (self.data / "postmaster.pid").exists():
            self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")
        shutil.rmtree(self.data, ignore_errors=True)
        if self.user:
            self.log.unlink(missing_ok=True)


S3_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


def start_s3(log_path: Path, bucket: str) -> tuple[subprocess.Popen, dict[str, str]]:
    """A moto S3 server on loopback holding an empty `bucket`, and the environment that points boto
    (so s3fs) at it: what a MinIO or S3 user sets with AWS_ENDPOINT_URL_S3 and credentials."""
    import boto3

    port = free_port()
    env = {**S3_CREDENTIALS, "AWS_ENDPOINT_URL_S3": f"http://127.0.0.1:{port}"}
    with open(log_path, "w") as log:
        server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], stdout=log,
                                  stderr=subprocess.STDOUT, start_new_session=True)
    wait_healthy(f"{env['AWS_ENDPOINT_URL_S3']}/moto-api/", server, timeout=60)
    boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL_S3"], aws_access_key_id="testing", aws_secret_access_key="testing",
                 region_name="us-east-1").create_bucket(Bucket=bucket)
    # fsspec caches file systems by their arguments, not by the environment they read the endpoint
    # from: an S3 file system made in this process for an earlier server would keep talking to it
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    return server, env


class Cluster:
    """Local servers and workers under `root` (logs, databases): `start_services` starts a `prefect
    server`, an `mlflow server` (SQLite backend, proxied artifacts), the `csd-gpu` process pool with
    this repository's deployments and automations; then `start_worker` for each worker."""

    def __init__(self, root: Path, database_url: str | None = None):
        """`database_url`: the Prefect server's database (a `postgresql+asyncpg://` URL, as the README
        deploys it for many workers); by default a SQLite file under `root`."""
        self.root = root
        self.processes: dict[str, subprocess.Popen] = {}
        self.logs = []
        self.prefect_port, self.mlflow_port = free_port(), free_port()
        self.api = f"http://127.0.0.1:{self.prefect_port}/api"
        self.mlflow_uri = f"http://127.0.0.1:{self.mlflow_port}"
        self.env = {**os.environ, "PREFECT_HOME": str(root / "prefect-home"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                    "PREFECT_API_DATABASE_CONNECTION_URL": database_url or f"sqlite+aiosqlite:///{root / 'prefect.db'}",
                    "PREFECT_WORKER_QUERY_SECONDS": "2", "MLFLOW_TRACKING_URI": self.mlflow_uri,
                    "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
        for name in ("PREFECT_API_URL", "CSD_ASSET_FAIL_STAGE"):
            self.env.pop(name, None)
        # every command runs in the repository root, as from a shell there (prefect.yaml's pull step
        # is `{{ $PWD }}` at `prefect deploy` time)
        self.env["PWD"] = str(ROOT)

    def start(self, name: str, args: list[str], **env: str) -> subprocess.Popen:
        log = open(self.root / f"{name}.log", "a")
        self.logs.append(log)
        process = subprocess.Popen(args, cwd=ROOT, env={**self.env, **env}, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        self.processes[name] = process
        return process

    def start_s3(self, bucket: str) -> dict[str, str]:
        """A moto S3 server holding `bucket`, for every process started after; returns its environment."""
        server, env = start_s3(self.root / "moto.log", bucket)
        self.processes["s3"] = server
        self.env.update(env)
        return env

    def start_services(self, crash_after_s: float, mlflow: bool = True) -> None:
        """Prefect and MLflow servers, the pool, the deployments, and the crash automation with its
        window set to `crash_after_s`. `mlflow=False`: no MLflow server, and no MLFLOW_TRACKING_URI
        (each output root gets its own `mlflow.db`, as on one machine)."""
        server = self.start("prefect-server", [*PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(self.prefect_port)])
        if mlflow:
            self.start_mlflow()
        else:
            self.env.pop("MLFLOW_TRACKING_URI", None)
        wait_healthy(f"{self.api}/health", server)
        self.env["PREFECT_API_URL"] = self.api
        self.prefect("work-pool", "create", "csd-gpu", "--type", "process")
        self.prefect("--no-prompt", "deploy", "--all")
        automations = yaml.safe_load((ROOT / "automations.yaml").read_text())
        for automation in automations["automations"]:
            automation["trigger"]["within"] = crash_after_s
        self.prefect("automation", "create", "--from-json", json.dumps(automations))

    def start_mlflow(self) -> None:
        server = self.start("mlflow", [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.mlflow_port),
                                       "--workers", "1", "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
                                       "--artifacts-destination", str(self.root / "mlartifacts")])
        wait_healthy(f"{self.mlflow_uri}/health", server)

    def start_worker(self, name: str, queue: str, limit: int, **env: str) -> subprocess.Popen:
        return self.start(name, [*PREFECT, "worker", "start", "--pool", "csd-gpu", "--work-queue", queue, "--limit", str(limit),
                                 "--name", name], **env)

    def prefect(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        done = subprocess.run([*PREFECT, *args], cwd=ROOT, env=self.env, capture_output=True, text=True, timeout=timeout)
        assert done.returncode == 0, f"prefect {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}"
        return done

    def client(self):
        from prefect.client.orchestration import get_client
        from prefect.settings import PREFECT_API_URL, temporary_settings

        with temporary_settings({PREFECT_API_URL: self.api}):
            return get_client(sync_client=True)

    def start_batch(self, parameters: dict) -> str:
        with self.client() as client:
            deployment = client.read_deployment_by_name("csd-asset/batch")
            return str(client.create_flow_run_from_deployment(deployment.id, parameters=parameters).id)

    def wait(self, flow_run_id: str, timeout: float = 600):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.client() as client:
                run = client.read_flow_run(flow_run_id)
            if run.state is not None and run.state.is_final():
                return run
            time.sleep(2)
        raise TimeoutError(f"flow run {flow_run_id} not finished after {timeout}s; logs in {self.root}")

    def asset_runs(self, batch_run_id: str) -> list:
        from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId

        with self.client() as client:
            return client.read_flow_runs(flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[batch_run_id])))

    def summary(self, batch_run_id: str) -> str:
        from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

        with self.client() as client:
            artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[batch_run_id])))
        return "\n".join(str(a.data) for a in artifacts)

    def close(self) -> None:
        for process in reversed(list(self.processes.values())):
            stop(process)
        for log in self.logs:
            log.close()
