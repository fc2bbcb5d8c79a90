"""The output root (stage store): one small interface, `Store`, and its two implementations.

`open_store("out")` or `open_store("file:///mnt/shared/csd")` is a `FolderStore`, used in place.
`open_store("s3://bucket/csd")` (or `gs://`, `az://`, any fsspec URL) is an `ObjectStore`: the same
layout in the bucket, plus a working copy per machine (`CSD_ASSET_WORK_DIR`, default
`<cache>/stores/<name>-<hash of the URL>`), because stages read and write ordinary files.
Credentials and endpoints come from fsspec's usual sources (`AWS_ENDPOINT_URL_S3`, …).
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
from stages.identity import file_digest

log = logging.getLogger(__name__)

LEASE_SECONDS = 90.0
"""An object-store stage lock not renewed for this long belongs to a dead run and may be taken over."""
MANIFEST_KEY = "manifest"
"""Key of the `{relative path: sha256}` manifest in an object-store stage's `result.json`."""
PARTIAL = ".partial"


class StoreError(RuntimeError):
    """The output root cannot be used (unknown protocol, missing credentials, broken commit)."""


class Store(Protocol):
    """What the pipeline, the tracking sync and the CLI need of an output root. Stages read and write
    under `local`; `rel` paths are relative to the root, with `/`; `remote` is the URL `local`
    mirrors, or None (for messages only: callers never branch on it)."""

    url: str
    local: Path
    remote: str | None

    def rel(self, path: Path) -> str: ...  # a path under `local`, relative to the root
    def path(self, rel: str) -> str: ...  # where `rel` lives for a user: a local path or a URL
    def read_bytes(self, rel: str) -> bytes | None: ...
    def read_text(self, rel: str) -> str | None: ...
    def write_text(self, rel: str, text: str) -> None: ...  # whole, atomically
    def remove(self, rel: str) -> None: ...
    def glob(self, pattern: str) -> list[str]: ...
    def committed(self, directory: Path, identity: str | None = None) -> StageResult | None: ...
    def lock(self, directory: Path) -> ContextManager[None]: ...  # the right to compute that stage
    def pull_upstream(self, directory: Path) -> None: ...  # an input stage into `local`
    def checkpoints(self, directory: Path, identity: str, callback: StepCallback) -> StepCallback: ...  # shared resumes
    def push_stage(self, directory: Path) -> None: ...  # commit a stage finished in `local` to the root


@dataclass(frozen=True)
class FolderStore:
    """A local or shared-file-system root, used in place: the stages' own rename commits and `flock`
    (`stages.common`) are all it needs, so its stage hooks do nothing."""

    url: str
    local: Path
    remote = None

    def rel(self, path: Path) -> str:
        return Path(path).relative_to(self.local).as_posix()

    def path(self, rel: str) -> str:
        return str(self.local / rel)

    def read_bytes(self, rel: str) -> bytes | None:
        with contextlib.suppress(FileNotFoundError, NotADirectoryError):
            return (self.local / rel).read_bytes()
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

    def pull_upstream(self, directory: Path) -> None:
        pass

    def checkpoints(self, directory: Path, identity: str, callback: StepCallback) -> StepCallback:
        return callback

    def push_stage(self, directory: Path) -> None:
        pass


@dataclass(frozen=True)
class ObjectStore(FolderStore):
    """A bucket that is the truth, and this machine's working copy `local` (a cache).

    Objects have no rename, so a stage is committed by uploading its files, then its `result.json`
    with a sha256 manifest of them: a crash mid-upload leaves no `result.json`, nothing looks done.
    A stage whose committed identity matches is reused without downloading it; a stage that runs
    first downloads its upstream stages, checked against their manifests (a mismatch, from an upload
    cut short or a lease lost, removes the commit, so the next run computes that stage again); its
    checkpoints go to `<stage>.partial/` as it runs, so a retry on another machine resumes there."""

    @property
    def remote(self) -> str:
        return self.url

    @property
    def fs(self):
        import fsspec

        return fsspec.core.url_to_fs(self.url)[0]  # fsspec caches file system instances

    def path(self, rel: str) -> str:
        return f"{self.url.rstrip('/')}/{rel}"

    def read_bytes(self, rel: str) -> bytes | None:
        with contextlib.suppress(FileNotFoundError):
            return self.fs.cat_file(self.path(rel))
        return None

    def write_text(self, rel: str, text: str) -> None:
        """One PUT (an object is replaced whole); the working copy keeps a copy."""
        super().write_text(rel, text)
        self.fs.pipe_file(self.path(rel), text.encode())

    def remove(self, rel: str) -> None:
        super().remove(rel)
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm_file(self.path(rel))

    def glob(self, pattern: str) -> list[str]:
        root = self.fs._strip_protocol(self.url).rstrip("/")
        self.fs.invalidate_cache()  # listings cached by this process miss what other machines wrote since
        return sorted(p[len(root) + 1 :] for p in self.fs.glob(f"{root}/{pattern}"))

    def _result(self, rel: str) -> tuple[str, dict]:
        """The committed `result.json` at `rel` (text and data), or `("", {})`."""
        text = self.read_text(f"{rel}/{RESULT_FILE}") or ""
        with contextlib.suppress(json.JSONDecodeError):
            if MANIFEST_KEY in (result := json.loads(text or "{}")):
                return text, result
        return "", {}

    def committed(self, directory: Path, identity: str | None = None) -> StageResult | None:
        """Whether or not its files are in this working copy; None for a path outside the root (a user's mesh)."""
        text = self._result(self.rel(directory))[0] if Path(directory).is_relative_to(self.local) else ""
        stage = StageResult.from_json(text, directory) if text else None
        return stage if stage is not None and identity in (None, stage.identity) else None

    def lock(self, directory: Path) -> ContextManager[None]:
        return _Lease(self, f"{self.rel(directory)}.lock")

    def pull_upstream(self, directory: Path) -> None:
        """Raises StoreError when the root has no committed stage there, or a file does not match."""
        if not Path(directory).is_relative_to(self.local):
            return
        rel, local = self.rel(directory), Path(directory)
        text, result = self._result(rel)
        if not text:
            raise StoreError(f"upstream stage {rel} is not committed in {self.url} (removed as broken, or deleted); "
                             "the next run of the asset computes it again")
        if (local / RESULT_FILE).is_file() and (local / RESULT_FILE).read_text() == text:
            return
        # downloaded beside it, then renamed into place: two workers sharing this working copy may pull at once
        incoming, old = (local.with_name(f".{local.name}.{what}-{uuid.uuid4().hex[:8]}") for what in ("pull", "old"))
        try:
            with contextlib.suppress(FileNotFoundError):  # a missing file is named below
                self.fs.get([self.path(f"{rel}/{n}") for n in result[MANIFEST_KEY]], [str(incoming / n) for n in result[MANIFEST_KEY]])
            for name, digest in result[MANIFEST_KEY].items():
                if not (incoming / name).is_file() or file_digest(incoming / name) != digest:
                    if self.read_text(f"{rel}/{RESULT_FILE}") == text:  # not recommitted meanwhile
                        self.fs.rm_file(self.path(f"{rel}/{RESULT_FILE}"))
                    raise StoreError(f"stage {rel} in {self.url}: {name} does not match its manifest (missing or changed: an "
                                     "upload cut short, or a lost lease); its commit is removed, so the next run computes it again")
            (incoming / RESULT_FILE).write_text(text)
            if local.exists():
                os.replace(local, old)
            os.replace(incoming, local)
        finally:
            shutil.rmtree(incoming, ignore_errors=True)
            shutil.rmtree(old, ignore_errors=True)
        log.info("stage %s: pulled from %s", rel, self.url)

    def checkpoints(self, directory: Path, identity: str, callback: StepCallback) -> StepCallback:
        """Pulls the root's checkpoint of an unfinished run with this identity (so it resumes where any
        machine left it) and returns `callback`, uploading `<stage>.partial/checkpoint.pt` whenever it
        changed. The step callback is the one explicit hook every stage takes; a checkpoint saved after
        step n's callback goes up at step n + 1's (a failed upload only warns: a resume elsewhere would
        start further back)."""
        partial, rel = Path(str(directory) + PARTIAL), self.rel(directory) + PARTIAL
        if self.read_text(f"{rel}/identity.txt") == identity:
            self.fs.get(self.path(rel) + "/", str(partial) + "/", recursive=True)
        seen = [None]

        def step(number: int, metrics: dict[str, float]) -> None:
            with contextlib.suppress(FileNotFoundError):
                if seen[0] != (stamp := (partial / "checkpoint.pt").stat().st_mtime_ns):
                    seen[0] = stamp
                    try:
                        self.fs.put([str(partial / n) for n in ("identity.txt", "checkpoint.pt")], self.path(rel) + "/")
                    except Exception as error:  # noqa: BLE001 — any storage error; the stage goes on
                        log.warning("could not upload checkpoint %s to %s: %s", partial, self.url, error)
            if callback is not None:
                callback(number, metrics)

        return step

    def push_stage(self, directory: Path) -> None:
        """Upload the working copy's committed stage: files, then `result.json` with the manifest (the
        commit), then drop the root's checkpoint; nothing when the root holds it already. (Objects under the
        stage that the manifest does not name, from an older commit, are ignored by every reader.)"""
        directory, rel = Path(directory), self.rel(directory)
        result = json.loads((directory / RESULT_FILE).read_text())
        manifest = result.get(MANIFEST_KEY) or {p.relative_to(directory).as_posix(): file_digest(p)
                                                for p in sorted(directory.rglob("*")) if p.is_file() and p.name != RESULT_FILE}
        if self._result(rel)[1].get(MANIFEST_KEY) == manifest:
            return
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm_file(self.path(f"{rel}/{RESULT_FILE}"))  # uncommit the older stage first
        self.fs.put([str(directory / name) for name in manifest], [self.path(f"{rel}/{name}") for name in manifest])
        committed = json.dumps({**result, MANIFEST_KEY: manifest}, indent=2)
        self.fs.pipe_file(self.path(f"{rel}/{RESULT_FILE}"), committed.encode())
        atomic_write_text(directory / RESULT_FILE, committed)
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm(self.path(rel + PARTIAL), recursive=True)
        log.info("stage %s: pushed to %s (%d files)", rel, self.url, len(manifest))


class _Lease:
    """A stage lock in an object store, made of conditional writes: `pipe_file(mode="create")` sends
    `If-None-Match: *`, which S3 (since 2024), MinIO, GCS and Azure honour atomically, so of two
    machines creating one object exactly one succeeds. The moto S3 server of the tests answers 412
    to the second, and eight racing machines never held one lock at once (tests/flows/test_store.py).
    Chosen over Prefect's global concurrency limits: no API server needed, it holds for any process
    (a CLI run too), and it lives next to the stage it guards.

    `<stage>.lock/<n>` are generations: the highest is the lease (owner, expiry), renewed every third
    of `LEASE_SECONDS`; a free or expired lease is taken by creating generation n + 1, so of two takers
    one wins. The highest is never deleted (a release marks it expired), so numbers never go back.
    It holds while clocks agree within the lease time and no holder pauses longer than it (that one
    logs an error at its next renewal; the manifest check catches what two writers mixed)."""

    def __init__(self, store: ObjectStore, rel: str, seconds: float = LEASE_SECONDS, poll: float = 1.0):
        self.store, self.rel, self.seconds, self.poll = store, rel, seconds, poll
        self.owner, self.generation = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}", -1
        self._stop = threading.Event()
        self._renewer = threading.Thread(target=self._renew, daemon=True, name=f"lease {rel}")

    def _generations(self) -> list[int]:
        return sorted(int(name) for key in self.store.glob(f"{self.rel}/*") if (name := key.rsplit("/", 1)[1]).isdigit()) or [-1]

    def _write(self, generation: int, expires: float, mode: str = "overwrite") -> None:
        body = json.dumps({"owner": self.owner, "expires": expires}).encode()
        self.store.fs.pipe_file(self.store.path(f"{self.rel}/{generation}"), body, mode=mode)

    def __enter__(self) -> "_Lease":
        waited = False
        while self.generation < 0:
            top = self._generations()[-1]
            holder = json.loads(self.store.read_text(f"{self.rel}/{top}") or "{}")
            if holder.get("expires", 0) < time.time():
                with contextlib.suppress(FileExistsError):  # another machine took it first
                    self._write(top + 1, time.time() + self.seconds, "create")
                    self.generation = top + 1
                    continue
            elif not waited:
                log.info("stage %s is being computed by %s; waiting", self.rel, holder.get("owner"))
                waited = True
            time.sleep(self.poll)
        for older in self._generations()[:-1]:
            with contextlib.suppress(FileNotFoundError):
                self.store.fs.rm_file(self.store.path(f"{self.rel}/{older}"))
        self._renewer.start()
        return self

    def _renew(self) -> None:
        while not self._stop.wait(self.seconds / 3):
            try:
                if self._generations()[-1] != self.generation:
                    return log.error("lease %s was taken over (this run paused longer than %.0f s?)", self.rel, self.seconds)
                self._write(self.generation, time.time() + self.seconds)
            except Exception as error:  # noqa: BLE001 — any storage error; the stage goes on, the lease may lapse
                log.warning("could not renew lease %s: %s", self.rel, error)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._renewer.join()
        if self._generations()[-1] == self.generation:
            self._write(self.generation, 0.0)


def open_store(out: "Store | str | Path", work_dir: Path | None = None) -> Store:
    """The store for an output root given as a path or URL (a store passes through)."""
    if isinstance(out, FolderStore):
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
    if work_dir is None and os.environ.get("CSD_ASSET_WORK_DIR"):
        work_dir = Path(os.environ["CSD_ASSET_WORK_DIR"])
    elif work_dir is None:
        from csd.prompts import cache_root

        work_dir = cache_root() / "stores" / f"{url.rstrip('/').rsplit('/', 1)[-1]}-{hashlib.sha256(url.encode()).hexdigest()[:12]}"
    return ObjectStore(url, Path(work_dir).absolute())
