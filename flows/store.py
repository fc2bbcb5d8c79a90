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
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import ContextManager, Protocol

import fsspec
from fsspec.implementations.dirfs import DirFileSystem

from stages.common import RESULT_FILE, StageResult, StepCallback, atomic_write_text, completed, stage_lock
from stages.identity import file_digest

log = logging.getLogger(__name__)

LEASE_SECONDS = 90.0
"""An object-store stage lock not renewed for this long belongs to a dead run and may be taken over."""
POLL_SECONDS = 1.0
"""How often a machine waiting for an object-store stage lock looks again."""
MANIFEST_KEY = "manifest"
"""Key of the `{relative path: sha256}` manifest in an object-store stage's `result.json`."""
CHECKPOINT_FILES = ("identity.txt", "checkpoint.pt")
"""What a stage's `<stage>.partial/` holds in the root: the identity it was started for and its last checkpoint."""


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
    def lock(self, directory: Path, timeout: float | None = None) -> ContextManager[None]: ...  # TimeoutError: held longer
    def prepare(self, directory: Path, inputs: Iterable[Path], identity: str, callback: StepCallback) -> StepCallback: ...
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
        return None if (data := self.read_bytes(rel)) is None else data.decode()

    def write_text(self, rel: str, text: str) -> None:
        (self.local / rel).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.local / rel, text)

    def remove(self, rel: str) -> None:
        (self.local / rel).unlink(missing_ok=True)

    def glob(self, pattern: str) -> list[str]:
        return sorted(self.rel(p) for p in self.local.glob(pattern))

    def committed(self, directory: Path, identity: str | None = None) -> StageResult | None:
        return completed(directory, identity)

    def lock(self, directory: Path, timeout: float | None = None) -> ContextManager[None]:
        return stage_lock(directory, timeout)

    def prepare(self, directory: Path, inputs: Iterable[Path], identity: str, callback: StepCallback) -> StepCallback:
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
    def fs(self) -> DirFileSystem:
        """The bucket as a file system whose paths are `rel` paths (fsspec caches file system instances)."""
        fs, root = fsspec.core.url_to_fs(self.url)
        return DirFileSystem(root, fs)

    def path(self, rel: str) -> str:
        return f"{self.url.rstrip('/')}/{rel}"

    def read_bytes(self, rel: str) -> bytes | None:
        with contextlib.suppress(FileNotFoundError):
            return self.fs.cat_file(rel)
        return None

    def write_text(self, rel: str, text: str) -> None:
        """One PUT (an object is replaced whole); the working copy keeps a copy."""
        super().write_text(rel, text)
        self.fs.pipe_file(rel, text.encode())

    def remove(self, rel: str) -> None:
        super().remove(rel)
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm_file(rel)

    def glob(self, pattern: str) -> list[str]:
        self.fs.invalidate_cache()  # listings cached by this process miss what other machines wrote since
        return sorted(self.fs.glob(pattern))

    def _result(self, rel: str) -> tuple[str, dict]:
        """The committed `result.json` of the stage at `rel` (text and data), or `("", {})`."""
        text = self.read_text(f"{rel}/{RESULT_FILE}") or ""
        return text, json.loads(text or "{}")

    def committed(self, directory: Path, identity: str | None = None) -> StageResult | None:
        """Whether or not its files are in this working copy; None for a path outside the root (a user's mesh)."""
        text = self._result(self.rel(directory))[0] if Path(directory).is_relative_to(self.local) else ""
        stage = StageResult.from_json(text, directory) if text else None
        return stage if stage is not None and identity in (None, stage.identity) else None

    def lock(self, directory: Path, timeout: float | None = None) -> ContextManager[None]:
        return _lease(self, f"{self.rel(directory)}.lock", timeout)

    def _pull(self, local: Path) -> None:
        """Download the committed stage `local` unless this copy holds it; raises StoreError when the root
        has none or a file does not match. Downloaded beside it, then renamed into place: two workers
        sharing this working copy may pull at once."""
        if not local.is_relative_to(self.local):  # a user's mesh
            return
        rel = self.rel(local)
        text, result = self._result(rel)
        if not text:
            raise StoreError(f"upstream stage {rel} is not committed in {self.url} (removed as broken, or deleted); "
                             "the next run of the asset computes it again")
        if (local / RESULT_FILE).is_file() and (local / RESULT_FILE).read_text() == text:
            return
        incoming, old = (local.with_name(f".{local.name}.{what}-{uuid.uuid4().hex[:8]}") for what in ("pull", "old"))
        manifest = result[MANIFEST_KEY]
        try:
            with contextlib.suppress(FileNotFoundError):  # a missing file is named below
                self.fs.get([f"{rel}/{name}" for name in manifest], [str(incoming / name) for name in manifest])
            for name, digest in manifest.items():
                if not (incoming / name).is_file() or file_digest(incoming / name) != digest:
                    if self.read_text(f"{rel}/{RESULT_FILE}") == text:  # not recommitted meanwhile
                        self.fs.rm_file(f"{rel}/{RESULT_FILE}")
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

    def prepare(self, directory: Path, inputs: Iterable[Path], identity: str, callback: StepCallback) -> StepCallback:
        """Pull the upstream stages `inputs` and the root's checkpoint of an unfinished run with this
        identity (so it resumes where any machine left it); returns `callback`, uploading the checkpoint
        whenever it changed: the step callback is the one explicit hook every stage takes. A checkpoint
        saved after step n's callback goes up at step n + 1's; a failed upload only warns."""
        for upstream in inputs:
            self._pull(Path(upstream))
        partial, rel = Path(f"{directory}.partial"), f"{self.rel(directory)}.partial"
        local, remote = [str(partial / name) for name in CHECKPOINT_FILES], [f"{rel}/{name}" for name in CHECKPOINT_FILES]
        if self.read_text(remote[0]) == identity:
            with contextlib.suppress(FileNotFoundError):  # no checkpoint uploaded yet: the stage starts afresh
                self.fs.get(remote, local)
        sent = [None]

        def step(number: int, metrics: dict[str, float]) -> None:
            checkpoint = partial / CHECKPOINT_FILES[1]
            if checkpoint.is_file() and sent[0] != (stamp := checkpoint.stat().st_mtime_ns):
                sent[0] = stamp
                try:
                    self.fs.put(local, remote)
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
            self.fs.rm_file(f"{rel}/{RESULT_FILE}")  # uncommit the older stage first
        self.fs.put([str(directory / name) for name in manifest], [f"{rel}/{name}" for name in manifest])
        self.write_text(f"{rel}/{RESULT_FILE}", json.dumps({**result, MANIFEST_KEY: manifest}, indent=2))
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm(f"{rel}.partial", recursive=True)
        log.info("stage %s: pushed to %s (%d files)", rel, self.url, len(manifest))


@contextlib.contextmanager
def _lease(store: ObjectStore, rel: str, timeout: float | None = None) -> Iterator[None]:
    """A lock (a stage's, a record's) in an object store, made of conditional writes: `pipe_file(mode="create")` sends
    `If-None-Match: *`, which S3, MinIO, GCS and Azure honour atomically (moto answers 412 to the second
    creator: tests/flows/test_store.py). Chosen over Prefect's global concurrency limits: no API server
    needed, it holds for any process (a CLI run too). `<stage>.lock/<n>` are generations: the highest is
    the lease (owner, expiry), renewed every third of `LEASE_SECONDS`; a free or expired one is taken by
    creating n + 1, so of two takers one wins. It holds while clocks agree within the lease time and no
    holder pauses longer (it then renews only its own, no longer highest, generation; the manifest check
    catches what two writers mixed)."""
    owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"

    def generations() -> list[int]:
        return sorted(int(name) for key in store.glob(f"{rel}/*") if (name := key.rsplit("/", 1)[1]).isdigit()) or [-1]

    def write(generation: int, expires: float, mode: str = "overwrite") -> None:
        store.fs.pipe_file(f"{rel}/{generation}", json.dumps({"owner": owner, "expires": expires}).encode(), mode=mode)

    waited, deadline = False, time.time() + (float("inf") if timeout is None else timeout)
    while True:
        generation = generations()[-1] + 1
        holder = json.loads(store.read_text(f"{rel}/{generation - 1}") or "{}")
        if holder.get("expires", 0) < time.time():
            with contextlib.suppress(FileExistsError):  # another machine took it first
                write(generation, time.time() + LEASE_SECONDS, "create")
                break
        elif time.time() >= deadline:
            raise TimeoutError(f"{rel} is held by {holder.get('owner')}")
        elif not waited:
            log.info("%s is held by %s; waiting", rel, holder.get("owner"))
            waited = True
        time.sleep(POLL_SECONDS)
    for older in generations()[:-1]:
        with contextlib.suppress(FileNotFoundError):
            store.fs.rm_file(f"{rel}/{older}")
    stop = threading.Event()

    def renew() -> None:
        while not stop.wait(LEASE_SECONDS / 3):
            try:
                write(generation, time.time() + LEASE_SECONDS)
            except Exception as error:  # noqa: BLE001 — any storage error; the stage goes on, the lease may lapse
                log.warning("could not renew lease %s: %s", rel, error)

    renewer = threading.Thread(target=renew, daemon=True, name=f"lease {rel}")
    renewer.start()
    try:
        yield
    finally:
        stop.set()
        renewer.join()
        write(generation, 0.0)


def open_store(out: "Store | str | Path", work_dir: Path | None = None) -> Store:
    """The store for an output root given as a path or URL (a store passes through)."""
    if isinstance(out, FolderStore):
        return out
    url = str(out)
    protocol, path = fsspec.core.split_protocol(url)
    if protocol in (None, "file", "local"):
        return FolderStore(url, Path(path).absolute())
    try:
        fsspec.get_filesystem_class(protocol)
    except (ImportError, ValueError) as error:
        raise StoreError(f"output root {url}: no fsspec file system for {protocol!r} ({error}); e.g. pip install s3fs") from error
    if work_dir is None:
        from csd.prompts import cache_root  # imports torch: only for object stores

        name = f"{url.rstrip('/').rsplit('/', 1)[-1]}-{hashlib.sha256(url.encode()).hexdigest()[:12]}"
        work_dir = os.environ.get("CSD_ASSET_WORK_DIR") or cache_root() / "stores" / name
    return ObjectStore(url, Path(work_dir).absolute())
