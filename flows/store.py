"""The output root (stage store): one small interface, `Store`, and its two implementations.

`open_store("out")` or `open_store("file:///mnt/shared/csd")` is a `FolderStore`: the folder is used
in place (stages commit by atomic rename and lock with `flock`, which NFS supports).

`open_store("s3://bucket/csd")` (or `gs://`, `az://`, … through fsspec) is an `ObjectStore`: the same
layout in the bucket, and a working copy per machine (`CSD_ASSET_WORK_DIR`, default
`<cache>/stores/<name>-<hash of the URL>`) because stages read and write ordinary files. Objects
have no rename and no lock, so a stage is committed by uploading its files and then its
`result.json` with a sha256 manifest of them, and locked by a lease made with conditional writes
(`_Lease`). Credentials and endpoints come from fsspec's usual sources (`AWS_ENDPOINT_URL_S3`, …).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import ContextManager, Protocol

from stages.common import RESULT_FILE, StageResult, StepCallback, atomic_write_text, completed, stage_lock

log = logging.getLogger(__name__)

LEASE_SECONDS = 90.0
"""An object-store stage lock not renewed for this long belongs to a dead run and may be taken over."""
MANIFEST_KEY = "manifest"
"""Key of the `{relative path: sha256}` manifest in an object-store stage's `result.json`."""
PARTIAL = ".partial"


class StoreError(RuntimeError):
    """The output root cannot be used (unknown protocol, missing credentials, broken commit)."""


class Store(Protocol):
    """What the pipeline, the tracking sync and the CLI need of an output root. `local` is where
    stages read and write; `rel` paths are relative to the root, with `/`."""

    url: str
    local: Path
    remote: str | None
    """The URL that `local` mirrors, or None when `local` is the root itself (for messages only)."""

    def path(self, rel: str) -> str: ...  # where `rel` lives for a user: a local path or a URL
    def read_bytes(self, rel: str) -> bytes | None: ...
    def read_text(self, rel: str) -> str | None: ...
    def write_text(self, rel: str, text: str) -> None: ...  # whole, atomically
    def remove(self, rel: str) -> None: ...
    def glob(self, pattern: str) -> list[str]: ...
    def committed(self, directory: Path, identity: str | None = None) -> StageResult | None: ...
    def lock(self, directory: Path) -> ContextManager[None]: ...  # the right to compute that stage
    def reusable(self, directory: Path, identity: str) -> StageResult | None: ...
    def pull_upstream(self, directory: Path) -> None: ...  # an input stage into `local`
    def pull_partial(self, directory: Path, identity: str) -> None: ...  # an unfinished run's checkpoint
    def checkpoints(self, directory: Path, callback: StepCallback) -> StepCallback: ...  # step callback that shares them
    def push_stage(self, directory: Path) -> None: ...  # commit a finished stage to the root


def _rel(store: Store, path: Path) -> str:
    return Path(path).relative_to(store.local).as_posix()


@dataclass(frozen=True)
class FolderStore:
    """A local or shared-file-system root, used in place: the stage code's own rename commits and
    `flock` (stages.common) are all it needs, so the stage hooks do nothing."""

    url: str
    local: Path
    remote = None

    def __str__(self) -> str:
        return self.url

    rel = _rel

    def path(self, rel: str) -> str:
        return str(self.local / rel)

    def read_bytes(self, rel: str) -> bytes | None:
        try:
            return (self.local / rel).read_bytes()
        except (FileNotFoundError, NotADirectoryError):
            return None

    def read_text(self, rel: str) -> str | None:
        data = self.read_bytes(rel)
        return None if data is None else data.decode()

    def write_text(self, rel: str, text: str) -> None:
        (self.local / rel).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.local / rel, text)

    def remove(self, rel: str) -> None:
        (self.local / rel).unlink(missing_ok=True)

    def glob(self, pattern: str) -> list[str]:
        return sorted(p.relative_to(self.local).as_posix() for p in self.local.glob(pattern))

    def committed(self, directory: Path, identity: str | None = None) -> StageResult | None:
        return completed(directory, identity)

    def lock(self, directory: Path) -> ContextManager[None]:
        return stage_lock(directory)

    def reusable(self, directory: Path, identity: str) -> StageResult | None:
        return completed(directory, identity)

    def pull_upstream(self, directory: Path) -> None:
        pass

    def pull_partial(self, directory: Path, identity: str) -> None:
        pass

    def checkpoints(self, directory: Path, callback: StepCallback) -> StepCallback:
        return callback

    def push_stage(self, directory: Path) -> None:
        pass


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class ObjectStore:
    """A bucket (any fsspec URL) that is the truth, and this machine's working copy `local`.

    A stage whose committed identity matches is reused without downloading it; a stage that runs
    first downloads its upstream stages and checks them against their manifests (a mismatch means
    two writers interleaved or an upload was cut: the commit is removed, so the next run computes
    that stage again); its checkpoints are uploaded to `<stage>.partial/` as it runs, so a run
    retried on another machine resumes from them."""

    url: str
    local: Path

    @property
    def remote(self) -> str:
        return self.url

    def __str__(self) -> str:
        return self.url

    rel = _rel

    @property
    def fs(self):
        import fsspec

        try:
            return fsspec.core.url_to_fs(self.url)[0]
        except (ImportError, ValueError) as error:
            raise StoreError(f"output root {self.url}: {error}") from error

    def _key(self, rel: str) -> str:
        return f"{self.url.rstrip('/')}/{rel}"

    def path(self, rel: str) -> str:
        return self._key(rel)

    def read_bytes(self, rel: str) -> bytes | None:
        try:
            return self.fs.cat_file(self._key(rel))
        except FileNotFoundError:
            return None

    def read_text(self, rel: str) -> str | None:
        data = self.read_bytes(rel)
        return None if data is None else data.decode()

    def write_text(self, rel: str, text: str) -> None:
        """One PUT (an object is replaced whole); the working copy keeps a copy."""
        (self.local / rel).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.local / rel, text)
        self.fs.pipe_file(self._key(rel), text.encode())

    def remove(self, rel: str) -> None:
        (self.local / rel).unlink(missing_ok=True)
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm_file(self._key(rel))

    def glob(self, pattern: str) -> list[str]:
        root = self.fs._strip_protocol(self.url).rstrip("/")
        self.fs.invalidate_cache()  # listings cached by this process miss what other machines wrote since
        return sorted(p[len(root) + 1 :] for p in self.fs.glob(f"{root}/{pattern}"))

    def _result(self, rel: str) -> tuple[str | None, dict]:
        text = self.read_text(f"{rel}/{RESULT_FILE}")
        try:
            result = json.loads(text) if text else {}
        except json.JSONDecodeError:
            result = {}
        return text, result if MANIFEST_KEY in result else {}

    def committed(self, directory: Path, identity: str | None = None) -> StageResult | None:
        """Whether or not the files are in this working copy yet; None for a path that is not a stage
        directory of this root (a user's mesh file)."""
        if not Path(directory).is_relative_to(self.local):
            return None
        text, result = self._result(self.rel(directory))
        stage = StageResult.from_json(text, directory) if result else None
        return stage if stage is not None and identity in (None, stage.identity) else None

    def lock(self, directory: Path) -> ContextManager[None]:
        return _Lease(self, f"{self.rel(directory)}.lock")

    def reusable(self, directory: Path, identity: str) -> StageResult | None:
        """Also uploads a stage this working copy committed but never uploaded (its run died in between)."""
        if self.committed(directory, identity) is None and completed(directory, identity) is not None:
            self.push_stage(directory)
        return self.committed(directory, identity)

    def pull_upstream(self, directory: Path) -> None:
        """Raises StoreError when the root has no committed stage at `directory`, or a file does not
        match the manifest (then the commit is removed, so that the next run computes it again)."""
        if not Path(directory).is_relative_to(self.local):
            return
        rel = self.rel(directory)
        text, result = self._result(rel)
        if not result:
            raise StoreError(f"upstream stage {rel} is not committed in {self.url} (removed as broken, or deleted); "
                             "the next run of the asset computes it again")
        if (completed(directory) is not None
                and json.loads((Path(directory) / RESULT_FILE).read_text()).get(MANIFEST_KEY) == result[MANIFEST_KEY]):
            return
        incoming = Path(directory).with_name(f".{Path(directory).name}.pull-{uuid.uuid4().hex[:8]}")
        try:
            for name, digest in result[MANIFEST_KEY].items():
                (incoming / name).parent.mkdir(parents=True, exist_ok=True)
                try:
                    self.fs.get_file(self._key(f"{rel}/{name}"), str(incoming / name))
                except FileNotFoundError:
                    self._broken(rel, text, f"{name} is missing")
                if _sha256(incoming / name) != digest:
                    self._broken(rel, text, f"{name} does not match its manifest")
            incoming.mkdir(parents=True, exist_ok=True)
            (incoming / RESULT_FILE).write_text(text)
            old = Path(directory).with_name(f".{Path(directory).name}.old-{os.getpid()}")
            if Path(directory).exists():
                os.replace(directory, old)
            os.replace(incoming, directory)
            shutil.rmtree(old, ignore_errors=True)
        finally:
            shutil.rmtree(incoming, ignore_errors=True)
        log.info("stage %s: pulled from %s", rel, self.url)

    def _broken(self, rel: str, text: str, why: str) -> None:
        if self.read_text(f"{rel}/{RESULT_FILE}") == text:  # not recommitted meanwhile
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm_file(self._key(f"{rel}/{RESULT_FILE}"))
        raise StoreError(f"stage {rel} in {self.url}: {why} (two writers interleaved, or an upload was cut short); "
                         "its commit is removed, so the next run computes it again")

    def pull_partial(self, directory: Path, identity: str) -> None:
        """The root's checkpoint of an unfinished run of this stage with this identity, so it resumes
        where any machine left it."""
        rel = self.rel(directory) + PARTIAL
        if self.read_text(f"{rel}/identity.txt") != identity:
            return
        partial = Path(str(directory) + PARTIAL)
        partial.mkdir(parents=True, exist_ok=True)
        for key in self.glob(f"{rel}/*"):
            name = key.rsplit("/", 1)[-1]
            self.fs.get_file(self._key(key), str(partial / f".{name}.pull"))
            os.replace(partial / f".{name}.pull", partial / name)
        log.info("stage %s: pulled the checkpoint of an unfinished run from %s", rel, self.url)

    def checkpoints(self, directory: Path, callback: StepCallback) -> StepCallback:
        """`callback`, uploading `<stage>.partial/checkpoint.pt` whenever it changed. The step callback
        is the one hook every stage takes: a checkpoint saved after step n's callback goes up at step
        n + 1's (a failed upload only warns: a resume elsewhere would start further back)."""
        partial, seen = Path(str(directory) + PARTIAL), [None]

        def step(number: int, metrics: dict[str, float]) -> None:
            checkpoint = partial / "checkpoint.pt"
            stamp = checkpoint.stat().st_mtime_ns if checkpoint.exists() else None
            if stamp not in (None, seen[0]):
                seen[0] = stamp
                rel = self.rel(partial)
                try:
                    self.fs.put_file(str(partial / "identity.txt"), self._key(f"{rel}/identity.txt"))
                    self.fs.put_file(str(checkpoint), self._key(f"{rel}/checkpoint.pt"))
                except Exception as error:
                    log.warning("could not upload checkpoint %s to %s: %s: %s", rel, self.url, type(error).__name__, error)
            if callback is not None:
                callback(number, metrics)

        return step

    def push_stage(self, directory: Path) -> None:
        """Upload the working copy's committed stage: files, then `result.json` with the manifest (the
        commit), then drop stale files and the root's checkpoint; nothing when the root holds it already."""
        directory, rel = Path(directory), self.rel(directory)
        result = json.loads((directory / RESULT_FILE).read_text())
        manifest = result.get(MANIFEST_KEY) or {p.relative_to(directory).as_posix(): _sha256(p)
                                                for p in sorted(directory.rglob("*")) if p.is_file() and p.name != RESULT_FILE}
        if self._result(rel)[1].get(MANIFEST_KEY) == manifest:
            return
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm_file(self._key(f"{rel}/{RESULT_FILE}"))  # uncommit the older stage first
        for name in manifest:
            self.fs.put_file(str(directory / name), self._key(f"{rel}/{name}"))
        committed = json.dumps({**result, MANIFEST_KEY: manifest}, indent=2)
        self.fs.pipe_file(self._key(f"{rel}/{RESULT_FILE}"), committed.encode())
        atomic_write_text(directory / RESULT_FILE, committed)
        for key in set(self.glob(f"{rel}/**")) - {f"{rel}/{name}" for name in [*manifest, RESULT_FILE]}:
            if self.fs.isfile(self._key(key)):
                self.fs.rm_file(self._key(key))
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm(self._key(rel + PARTIAL), recursive=True)
        log.info("stage %s: pushed to %s (%d files)", rel, self.url, len(manifest))


class _Lease:
    """A stage lock in an object store, made of conditional writes (`If-None-Match: *`, fsspec's
    `pipe_file(mode="create")`): S3 (since 2024), MinIO, GCS and Azure refuse to create an object
    that exists, atomically, so of two machines creating the same object exactly one succeeds. The
    moto S3 server the tests use answers 412 to the second (tests/flows/test_store.py measures it
    and the exclusion). Chosen over Prefect global concurrency limits because it needs no API
    server, holds for any process on any machine (a CLI run too), and lives next to the stage.

    `<stage>.lock/<n>` are generations: the highest one is the lease, holding its owner and expiry,
    renewed every third of `LEASE_SECONDS`. A free or expired lease is taken by creating generation
    n + 1, so two takers of a dead holder's lease cannot both win; the top generation is never
    deleted (released means marked expired), so numbers never go back. Correct as long as clocks
    agree within the lease time and a holder is not paused longer than it (then it logs an error on
    its next renewal, and the manifest check still catches files two writers mixed)."""

    def __init__(self, store: ObjectStore, rel: str, seconds: float = LEASE_SECONDS, poll: float = 1.0):
        self.store, self.rel, self.seconds, self.poll = store, rel, seconds, poll
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.generation = -1
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None

    def _generations(self) -> list[int]:
        return sorted(int(name) for key in self.store.glob(f"{self.rel}/*") if (name := key.rsplit("/", 1)[1]).isdigit())

    def _top(self) -> tuple[int, dict]:
        top = (self._generations() or [-1])[-1]
        text = self.store.read_text(f"{self.rel}/{top}") if top >= 0 else None
        return top, json.loads(text) if text else {}

    def _write(self, generation: int, expires: float, mode: str) -> None:
        body = json.dumps({"owner": self.owner, "expires": expires}).encode()
        self.store.fs.pipe_file(self.store._key(f"{self.rel}/{generation}"), body, mode=mode)

    def __enter__(self) -> "_Lease":
        waited = False
        while True:
            top, holder = self._top()
            if holder.get("expires", 0) < time.time():
                try:
                    self._write(top + 1, time.time() + self.seconds, "create")
                    self.generation = top + 1
                    break
                except FileExistsError:  # another machine took it first
                    pass
            elif not waited:
                log.info("stage %s is being computed by %s; waiting", self.rel, holder.get("owner"))
                waited = True
            time.sleep(self.poll)
        for older in [g for g in self._generations() if g < self.generation]:  # irrelevant now: tidy up
            with contextlib.suppress(FileNotFoundError):
                self.store.fs.rm_file(self.store._key(f"{self.rel}/{older}"))
        self._renewer = threading.Thread(target=self._renew, daemon=True, name=f"lease {self.rel}")
        self._renewer.start()
        return self

    def _renew(self) -> None:
        while not self._stop.wait(self.seconds / 3):
            try:
                if self._top()[0] != self.generation:
                    log.error("lease %s was taken over (this run paused longer than %.0f s?)", self.rel, self.seconds)
                    return
                self._write(self.generation, time.time() + self.seconds, "overwrite")
            except Exception as error:  # the stage goes on; the lease may lapse
                log.warning("could not renew lease %s: %s", self.rel, error)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join()
        if self._top()[0] == self.generation:
            self._write(self.generation, 0.0, "overwrite")


def default_work_dir(url: str) -> Path:
    """Where this machine keeps its working copy of the object-store root `url`."""
    if os.environ.get("CSD_ASSET_WORK_DIR"):
        return Path(os.environ["CSD_ASSET_WORK_DIR"])
    from csd.prompts import cache_root

    name = url.rstrip("/").rsplit("/", 1)[-1] or "root"
    return cache_root() / "stores" / f"{name}-{hashlib.sha256(url.encode()).hexdigest()[:12]}"


def open_store(out: "Store | str | Path", work_dir: Path | None = None) -> Store:
    """The store for an output root given as a path or URL (a store passes through)."""
    if isinstance(out, (FolderStore, ObjectStore)):
        return out
    url = str(out)
    protocol, _, rest = url.partition("://") if "://" in url else ("file", "", url)
    if protocol in ("file", "local"):
        return FolderStore(url, Path(rest).absolute())
    import fsspec

    try:
        fsspec.get_filesystem_class(protocol)
    except (ImportError, ValueError) as error:
        raise StoreError(f"output root {url}: no fsspec file system for {protocol!r} ({error}); e.g. pip install s3fs") from error
    return ObjectStore(url, Path(work_dir or default_work_dir(url)).absolute())
