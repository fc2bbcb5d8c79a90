"""Output roots given as fsspec URLs: stages committed with a manifest, checkpoints shared so another
machine resumes, records read from the root. "Machines" are stores with their own working copies;
`memory://` stands in for a bucket in-process, and a moto S3 server for the real protocol."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import fsspec
import pytest
import s3fs
import trimesh

from flows.catalog import CatalogRow
from flows.pipeline import AssetRecord, StageFailed, StageOutcome, close_abandoned, execute_stage, plan_asset, run_asset, stage_states
from flows.store import MANIFEST_KEY, StoreError, open_store
from servers import start_s3, stop

ROOT = Path(__file__).parents[2]
CUBE = ROOT / "catalogs" / "meshes" / "cube.obj"


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def bucket():
    url = f"memory://csd-test-{uuid.uuid4().hex[:8]}/out"
    yield url
    with contextlib.suppress(FileNotFoundError):
        fsspec.filesystem("memory").rm(url.split("://")[1].split("/")[0], recursive=True)


def _machine(url: str, tmp_path: Path, name: str):
    return open_store(url, work_dir=tmp_path / f"machine-{name}")


def test_a_folder_and_a_file_url_are_used_in_place(tmp_path):
    for out in (tmp_path / "out", f"file://{tmp_path / 'out'}"):
        store = open_store(out)
        assert store.remote is None and store.local == tmp_path / "out"
    with pytest.raises(StoreError, match="nosuch://bucket/x.*nosuch"):
        open_store("nosuch://bucket/x")


def test_a_crashed_stage_resumes_on_another_machine_and_a_third_reuses_it(bucket, tmp_path, tiny):
    overrides = {**tiny, "nerf.steps": 8, "nerf.checkpoint_every": 4}
    row = CatalogRow("red", "a red cube", line=2)
    plan_on = {name: plan_asset(row, _machine(bucket, tmp_path, name), overrides=overrides) for name in "abcd"}
    stage_on = {name: plan.stage("nerf") for name, plan in plan_on.items()}
    remote = fsspec.filesystem("memory")
    root = bucket.split("://")[1]

    def crash_at_6(step, metrics):
        if step == 6:
            raise RuntimeError("machine a died")

    with pytest.raises(StageFailed, match="machine a died"):
        execute_stage(stage_on["a"], callback=crash_at_6)
    assert remote.exists(f"{root}/red/nerf.partial/checkpoint.pt"), "the step-4 checkpoint reached the root"
    assert not remote.exists(f"{root}/red/nerf/result.json")

    seen = []
    outcome = execute_stage(stage_on["b"], callback=lambda step, metrics: seen.append(step))
    assert outcome.status == "ran" and seen == [5, 6, 7, 8], "machine b resumed from machine a's checkpoint"
    assert outcome.result.metrics["resumed_at"] == 4
    committed = json.loads(remote.cat_file(f"{root}/red/nerf/result.json"))
    files_b = stage_on["b"].directory
    assert committed[MANIFEST_KEY] == {
        p.relative_to(files_b).as_posix(): _sha(p) for p in files_b.rglob("*") if p.is_file() and p.name != "result.json"
    }
    assert not remote.exists(f"{root}/red/nerf.partial"), "the root's checkpoint goes once the stage is committed"

    outcome = execute_stage(stage_on["c"], callback=lambda step, metrics: pytest.fail("machine c must not compute"))
    assert outcome.status == "reused"
    assert not stage_on["c"].directory.exists(), "a reused stage is not downloaded"
    assert execute_stage(plan_on["c"].stage("mesh")).status == "ran"
    assert {n: _sha(stage_on["c"].directory / n) for n in committed[MANIFEST_KEY]} == committed[MANIFEST_KEY], \
        "a stage that runs downloads its upstream stage"

    # a file in the root that does not match the manifest (writers interleaved): the stage that needs it
    # fails and removes the broken commit, so the next run computes the upstream stage again
    remote.pipe_file(f"{root}/red/nerf/history.json", b"[]")
    assert execute_stage(stage_on["d"]).status == "reused"
    with pytest.raises(StageFailed, match="red/nerf .*history.json does not match its manifest"):
        execute_stage(plan_on["d"].stage("mesh"), force=True)
    assert not remote.exists(f"{root}/red/nerf/result.json")
    assert execute_stage(stage_on["d"]).status == "ran"
    assert json.loads(remote.cat_file(f"{root}/red/nerf/history.json")) != []
    assert execute_stage(plan_on["d"].stage("mesh")).status == "ran", "mesh comes after the recomputed nerf"


def test_records_and_states_come_from_the_root(bucket, tmp_path, tiny):
    plan = plan_asset(CatalogRow("box", "a box", mesh=str(CUBE), line=2), _machine(bucket, tmp_path, "a"), overrides=tiny)
    record = AssetRecord.start(plan, {"asset_run_id": "r1"})
    record.stages["mesh"].update(status="ran")
    record.hand_to_batch(plan.store, "batch-1")
    record.save(plan.store)
    execute_stage(plan.stage("mesh"))

    elsewhere = _machine(bucket, tmp_path, "b")
    assert AssetRecord.load(elsewhere, "box").tracking == {"asset_run_id": "r1"}
    assert stage_states(elsewhere)["box"] == {"mesh": "done", "uv": "missing", "texture": "missing", "export": "missing"}
    assert AssetRecord.collect(elsewhere, "box", "batch-1").asset_id == "box"
    assert AssetRecord.collect(elsewhere, "box", "batch-1") is None, "a hand-over record is read once"
    assert not (elsewhere.local / "box" / "mesh").exists(), "status reads the root, it downloads nothing"


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    server, env = start_s3(tmp_path_factory.mktemp("moto") / "moto.log", "csd")
    try:
        yield env
    finally:
        stop(server)


# a moto S3 server and two `csd-asset run` processes: ~2 min on 2 cores
@pytest.mark.slow
def test_two_machines_share_an_s3_root(s3, tmp_path, tiny):
    """`csd-asset run --out s3://…` on machine a makes the asset; machine b (its own working copy)
    reuses every stage; `csd-asset status` on a third reads it from the bucket."""
    (tmp_path / "catalog.csv").write_text(f"asset_id,prompt,seed,mesh\nbox,a grey box,0,{CUBE}\n")
    url = "s3://csd/nightly"
    base = [sys.executable, "-m", "flows.cli"]
    sets = [f"--set={key}={value}" for key, value in tiny.items()]
    env = {**os.environ, **s3, "OMP_NUM_THREADS": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    env.pop("MLFLOW_TRACKING_URI", None)

    def run(machine: str, *args: str) -> subprocess.CompletedProcess:
        (tmp_path / machine / "prefect").mkdir(parents=True, exist_ok=True)
        machine_env = {**env, "CSD_ASSET_WORK_DIR": str(tmp_path / machine / "work"), "PREFECT_HOME": str(tmp_path / machine / "prefect")}
        return subprocess.run([*base, *args], cwd=ROOT, env=machine_env, capture_output=True, text=True, timeout=900)

    first = run("a", "run", str(tmp_path / "catalog.csv"), "--out", url, *sets)
    assert first.returncode == 0, first.stdout + first.stderr
    assert "s3://csd/nightly/box/export/" in first.stdout, "the output is named by its URL"
    second = run("b", "run", str(tmp_path / "catalog.csv"), "--out", url, *sets)
    assert second.returncode == 0, second.stdout + second.stderr
    record_b = json.loads((tmp_path / "b" / "work" / "box" / "asset.json").read_text())
    assert {name: entry["status"] for name, entry in record_b["stages"].items()} == dict.fromkeys(["mesh", "uv", "texture", "export"], "reused")
    assert not [name for name in record_b["stages"] if (tmp_path / "b" / "work" / "box" / name).exists()], "machine b downloaded no stage"

    status = run("c", "status", "--out", url)
    assert status.returncode == 0 and status.stdout.split("\n")[1].split() == ["box", "-", "done", "done", "done", "-", "done"]
    remote = s3fs.S3FileSystem(endpoint_url=s3["AWS_ENDPOINT_URL_S3"], key="testing", secret="testing")
    glb = next(p for p in remote.ls("csd/nightly/box/export") if p.endswith(".glb"))
    local_glb = tmp_path / "a" / "work" / "box" / "export" / Path(glb).name
    assert remote.cat_file(glb) == local_glb.read_bytes()
    mesh = trimesh.load(local_glb, force="mesh")
    assert len(mesh.faces) > 0


def test_a_lease_excludes_others_until_released_and_a_dead_holders_is_taken_over_once_expired(bucket, tmp_path):
    store = _machine(bucket, tmp_path, "a")
    stage_dir = store.local / "red" / "nerf"
    order = []

    def second():
        with store.lock(stage_dir):
            order.append("second in")

    with store.lock(stage_dir):
        order.append("first in")
        waiter = threading.Thread(target=second)
        waiter.start()
        time.sleep(2.5)
        order.append("first out")
    waiter.join(timeout=30)
    assert order == ["first in", "first out", "second in"]
    remote, lease = fsspec.filesystem("memory"), f"{bucket.split('://')[1]}/red/nerf.lock"
    (top,) = remote.ls(lease, detail=False)
    assert top.endswith("/1") and json.loads(remote.cat_file(top))["expires"] == 0, "one generation left, released"

    # a holder that died leaves its lease; it is taken over once expired, not before
    remote.pipe_file(f"{lease}/7", json.dumps({"owner": "dead-host:1:x", "expires": time.time() + 2}).encode())
    started = time.monotonic()
    with store.lock(stage_dir):
        waited = time.monotonic() - started
        assert [Path(p).name for p in remote.ls(lease, detail=False)] == ["8"], "the dead holder's generation is gone"
    assert 1.5 < waited < 10, waited


def test_a_record_left_running_in_a_bucket_is_ended_only_once_its_owners_lease_has_lapsed(bucket, tmp_path, tiny):
    store = _machine(bucket, tmp_path, "a")
    stages = {"nerf": {"status": "running", "identity": "n"}, "mesh": {"status": "pending", "identity": "m"}}
    AssetRecord("red", {"asset_id": "red"}, "toy-cpu", {}, stages=stages, worker={"host": "gpu-b", "pid": 7}).save(store)
    lease = f"{bucket.split('://')[1]}/red/asset.lock"
    fsspec.filesystem("memory").pipe_file(f"{lease}/0", json.dumps({"owner": "gpu-b:7:x", "expires": time.time() + 2}).encode())
    assert not close_abandoned(store, "red/asset.json"), "a live lease: running on another machine"
    assert AssetRecord.load(store, "red").status == "running"
    started = time.monotonic()
    assert close_abandoned(store, "red/asset.json", wait=30), "its owner stopped renewing: ended once the lease lapsed"
    assert 1 < time.monotonic() - started < 20
    ended = AssetRecord.load(store, "red")
    assert ended.status == "failed" and ended.stages["mesh"]["status"] == "blocked"
    assert "stage 'nerf' of asset 'red' did not finish: the process that ran it (gpu-b pid 7)" in ended.stages["nerf"]["error"]
    assert not close_abandoned(store, "red/asset.json"), "an ended record is left as it is"

    probes = []

    def execute(stage, force):  # a new run of the asset on machine b, probed from machine a as it runs
        probes.append(close_abandoned(store, "red/asset.json"))
        return StageOutcome(stage.name, "ran", stage.identity)

    plan = plan_asset(CatalogRow("red", "a red cube", mesh=str(CUBE), line=2), _machine(bucket, tmp_path, "b"), overrides=tiny)
    assert run_asset(plan, execute=execute).status == "completed"
    assert probes == [False] * 4, "its lease is held while it runs"
    assert AssetRecord.load(store, "red").status == "completed"


@pytest.mark.slow
def test_conditional_writes_make_the_s3_lease_exclusive(s3, tmp_path, monkeypatch):
    """Against the moto S3 server: a second create of the same object is refused (HTTP 412), and eight
    machines racing for one stage lock never hold it at once."""
    for key, value in s3.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr("flows.store.POLL_SECONDS", 0.05)
    fs = s3fs.S3FileSystem(endpoint_url=s3["AWS_ENDPOINT_URL_S3"])
    fs.pipe_file("csd/probe", b"1", mode="create")
    with pytest.raises(FileExistsError):
        fs.pipe_file("csd/probe", b"2", mode="create")
    holders, overlaps = [], []

    def machine(name: str) -> None:
        store = open_store("s3://csd/race", work_dir=tmp_path / name)
        for _ in range(3):
            with store.lock(store.local / "red" / "nerf"):
                holders.append(name)
                overlaps.append(len(holders) > 1)
                time.sleep(0.05)
                holders.remove(name)

    threads = [threading.Thread(target=machine, args=(f"m{i}",)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert len(overlaps) == 24 and not any(overlaps)
