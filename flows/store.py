"""The output root (stage store): a local folder, or any fsspec URL shared by several machines.

`open_store("out")` or `open_store("file:///mnt/shared/csd")` uses the folder in place: stage
directories are committed by atomic rename and locked with `flock` (which NFS supports).

`open_store("s3://bucket/csd")` (or `gs://`, `az://`, …) keeps the same layout in the bucket and a
local working copy per machine (`CSD_ASSET_WORK_DIR`, default `<cache>/stores/<hash of the URL>`),
because stages read and write ordinary files (torch, trimesh, imageio). Objects have no rename and
no lock, so:

- **commit**: a stage's files are uploaded first and its `result.json` last, carrying a manifest
  (sha256 of every file); a crash mid-upload leaves no `result.json`, so nothing looks done.
- **reuse**: a stage whose committed identity matches is reused without downloading it; a stage
  that runs downloads its upstream stages and checks them against their manifests. Files that do
  not match (two writers interleaved) fail that stage and remove the broken commit, so the next run
  computes the upstream stage again.
- **checkpoints**: every checkpoint a stage saves (`TrainingCheckpoint`) is uploaded to
  `<stage>.partial/`, so a run retried on another machine resumes from it.
- **lock**: a lease object `<stage>.lock` (owner, expiry) renewed while the stage runs; a crashed
  holder's lease expires after `LEASE_SECONDS`. Leases are best effort (two machines may, in a narrow
  race, both compute a stage; the manifest check catches files their uploads mixed).
- **records**: `asset.json` and the batch hand-over records are single objects, written whole.

Credentials and endpoints come from fsspec's usual sources (e.g. `AWS_PROFILE`,
`AWS_ENDPOINT_URL_S3` for MinIO, or `FSSPEC_S3_*` variables).
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
from typing import Any, Iterator

from stages.common import RESULT_FILE, StageResult, atomic_write_text, checkpoint_saved, completed, stage_lock

log = logging.getLogger(__name__)

LEASE_SECONDS = 90.0
"""A remote stage lock not renewed for this long belongs to a dead run and may be taken over."""
MANIFEST_KEY = "manifest"
"""Key of the `{relative path: sha256}` manifest in a remote stage's `result.json`."""
PARTIAL = ".partial"


class StoreError(RuntimeError):
    """The output root cannot be used (unknown protocol, missing credentials, unreachable)."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _local_path(url: str) -> Path | None:
    """The folder a plain path or `file://` URL names, or None for other protocols."""
    if "://" not in url:
        return Path(url)
    protocol, _, rest = url.partition("://")
    return Path(rest) if protocol in ("file", "local") else None


def default_work_dir(url: str) -> Path:
    """Where this machine keeps its working copy of the remote root `url`."""
    if os.environ.get("CSD_ASSET_WORK_DIR"):
        return Path(os.environ["CSD_ASSET_WORK_DIR"])
    from csd.prompts import cache_root

    name = url.rstrip("/").rsplit("/", 1)[-1] or "root"
    return cache_root() / "stores" / f"{name}-{hashlib.sha256(url.encode()).hexdigest()[:12]}"


@dataclass(frozen=True)
class Store:
    """An output root. `local` is where stages read and write; `remote` is the fsspec URL it mirrors,
    or None when `local` is the root itself."""

    url: str
    local: Path
    remote: str | None = None

    def __str__(self) -> str:
        return self.url

    @property
    def fs(self):
        import fsspec

        try:
            return fsspec.core.url_to_fs(self.remote)[0]
        except (ImportError, ValueError) as error:
            raise StoreError(f"output root {self.url}: {error}") from error

    def _key(self, rel: str) -> str:
        return f"{self.remote.rstrip('/')}/{rel}"

    def rel(self, path: Path) -> str:
        """`path` (under `local`) relative to the root, with `/` separators."""
        return Path(path).relative_to(self.local).as_posix()

    def path(self, rel: str) -> str:
        """Where `rel` lives for a user: a local path or a URL."""
        return str(self.local / rel) if self.remote is None else self._key(rel)

    # ---- small records (asset.json, batch hand-over) ----

    def read_bytes(self, rel: str) -> bytes | None:
        if self.remote is None:
            try:
                return (self.local / rel).read_bytes()
            except FileNotFoundError:
                return None
        try:
            return self.fs.cat_file(self._key(rel))
        except FileNotFoundError:
            return None

    def read_text(self, rel: str) -> str | None:
        data = self.read_bytes(rel)
        return None if data is None else data.decode()

    def write_text(self, rel: str, text: str) -> None:
        """Write whole: atomic rename locally, one PUT remotely (the working copy keeps a copy)."""
        path = self.local / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, text)
        if self.remote is not None:
            self.fs.pipe_file(self._key(rel), text.encode())

    def remove(self, rel: str) -> None:
        (self.local / rel).unlink(missing_ok=True)
        if self.remote is not None:
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm_file(self._key(rel))

    def glob(self, pattern: str) -> list[str]:
        """Relative paths under the root matching `pattern` (e.g. `*/asset.json`), sorted."""
        if self.remote is None:
            return sorted(p.relative_to(self.local).as_posix() for p in self.local.glob(pattern))
        root = self.fs._strip_protocol(self.remote).rstrip("/")
        self.fs.invalidate_cache()  # listings cached by this process miss what other machines wrote since
        return sorted(p[len(root) + 1 :] for p in self.fs.glob(f"{root}/{pattern}"))

    def committed(self, directory: Path, identity: str | None = None) -> StageResult | None:
        """The result of the stage committed at `directory` in the root (with `identity` when given),
        whether or not its files are in this machine's working copy yet; None for a path that is not a
        stage directory of this root (a user's mesh file)."""
        if self.remote is None:
            return completed(directory, identity)
        try:
            text = self.read_text(f"{self.rel(directory)}/{RESULT_FILE}")
            result = StageResult.from_json(text, directory) if text and MANIFEST_KEY in json.loads(text) else None
        except (ValueError, TypeError):  # outside the root, or not a result
            return None
        return result if result is not None and identity in (None, result.identity) else None

    # ---- stage directories ----

    @contextlib.contextmanager
    def lock(self, directory: Path) -> Iterator[None]:
        """Exclusive right to compute the stage at `directory`: `flock` locally, a lease remotely."""
        if self.remote is None:
            with stage_lock(directory):
                yield
            return
        with _Lease(self, f"{self.rel(directory)}.lock"):
            yield

    def reusable(self, directory: Path, identity: str) -> StageResult | None:
        """`committed(directory, identity)`, after uploading a stage that this working copy committed
        but never uploaded (its run died in between)."""
        result = self.committed(directory, identity)
        if result is None and self.remote is not None and completed(directory, identity) is not None:
            self.push_stage(directory)
            result = self.committed(directory, identity)
        return result

    def pull_upstream(self, directory: Path) -> None:
        """Bring the upstream stage committed in the root at `directory` into the working copy (unless
        it is there already); nothing for a local root or a path outside it (a user's mesh file).
        Raises StoreError when the root has no committed stage there, or when a file does not match
        the manifest (two writers interleaved): then the commit is removed, so that the next run of
        the asset computes that stage again."""
        if self.remote is None or not Path(directory).is_relative_to(self.local):
            return
        rel = self.rel(directory)
        text = self.read_text(f"{rel}/{RESULT_FILE}")
        try:
            result = json.loads(text) if text else {}
        except json.JSONDecodeError:
            result = {}
        if MANIFEST_KEY not in result:
            raise StoreError(f"upstream stage {rel} is not committed in {self.url} (removed as broken, or deleted); "
                             "the next run of the asset computes it again")
        local_result = Path(directory) / RESULT_FILE
        if local_result.exists() and json.loads(local_result.read_text()).get(MANIFEST_KEY) == result[MANIFEST_KEY]:
            return
        incoming = Path(directory).with_name(f".{Path(directory).name}.pull-{uuid.uuid4().hex[:8]}")
        try:
            for name, digest in result[MANIFEST_KEY].items():
                target = incoming / name
                target.parent.mkdir(parents=True, exist_ok=True)
                try:
                    self.fs.get_file(self._key(f"{rel}/{name}"), str(target))
                except FileNotFoundError:
                    self._broken(rel, text, f"{name} is missing")
                if _sha256(target) != digest:
                    self._broken(rel, text, f"{name} does not match its manifest")
            incoming.mkdir(parents=True, exist_ok=True)
            (incoming / RESULT_FILE).write_text(text)
            _replace_dir(incoming, Path(directory))
        finally:
            shutil.rmtree(incoming, ignore_errors=True)
        log.info("stage %s: pulled from %s", rel, self.url)

    def _broken(self, rel: str, text: str, why: str) -> None:
        """Uncommit the stage at `rel` (if its result is still `text`) and raise StoreError."""
        if self.read_text(f"{rel}/{RESULT_FILE}") == text:
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm_file(self._key(f"{rel}/{RESULT_FILE}"))
        raise StoreError(f"stage {rel} in {self.url}: {why} (two writers interleaved, or an upload was cut short); "
                         "its commit is removed, so the next run computes it again")

    def push_stage(self, directory: Path) -> None:
        """Upload the working copy's committed stage at `directory`: files, then `result.json` with
        the manifest (the commit). Skipped when the root already holds exactly this result."""
        if self.remote is None:
            return
        directory = Path(directory)
        rel = self.rel(directory)
        result = json.loads((directory / RESULT_FILE).read_text())
        files = sorted(p for p in directory.rglob("*") if p.is_file() and p.name != RESULT_FILE)
        manifest = result.get(MANIFEST_KEY) or {p.relative_to(directory).as_posix(): _sha256(p) for p in files}
        remote_text = self.read_text(f"{rel}/{RESULT_FILE}")
        if remote_text and json.loads(remote_text).get(MANIFEST_KEY) == manifest:
            return
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm_file(self._key(f"{rel}/{RESULT_FILE}"))  # uncommit the older stage first
        for name in manifest:
            self.fs.put_file(str(directory / name), self._key(f"{rel}/{name}"))
        stale = set(self.glob(f"{rel}/**")) - {f"{rel}/{name}" for name in manifest} - {f"{rel}/{RESULT_FILE}"}
        for key in sorted(stale):
            if self.fs.isfile(self._key(key)):
                self.fs.rm_file(self._key(key))
        committed = json.dumps({**result, MANIFEST_KEY: manifest}, indent=2)
        self.fs.pipe_file(self._key(f"{rel}/{RESULT_FILE}"), committed.encode())
        atomic_write_text(directory / RESULT_FILE, committed)
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm(self._key(rel + PARTIAL), recursive=True)
        log.info("stage %s: pushed to %s (%d files)", rel, self.url, len(manifest))

    def pull_partial(self, directory: Path, identity: str) -> None:
        """Bring the root's checkpoint of an unfinished run of this stage (same identity) into the
        working copy, so the stage resumes where any machine left it."""
        if self.remote is None:
            return
        rel = self.rel(directory) + PARTIAL
        if self.read_text(f"{rel}/identity.txt") != identity:
            return
        partial = Path(str(directory) + PARTIAL)
        partial.mkdir(parents=True, exist_ok=True)
        for key in self.glob(f"{rel}/*"):
            name = key.rsplit("/", 1)[-1]
            tmp = partial / f".{name}.pull"
            self.fs.get_file(self._key(key), str(tmp))
            os.replace(tmp, partial / name)
        log.info("stage %s: pulled the checkpoint of an unfinished run from %s", rel, self.url)

    @contextlib.contextmanager
    def publishing_checkpoints(self) -> Iterator[None]:
        """While the stage runs, upload every checkpoint it saves (and the partial's identity)."""
        if self.remote is None:
            yield
            return

        def publish(path: Path) -> None:
            rel = self.rel(path.parent)
            try:
                self.fs.put_file(str(path.parent / "identity.txt"), self._key(f"{rel}/identity.txt"))
                self.fs.put_file(str(path), self._key(f"{rel}/{path.name}"))
            except Exception as error:  # the stage goes on; only a resume on another machine would start further back
                log.warning("could not upload checkpoint %s to %s: %s: %s", rel, self.url, type(error).__name__, error)

        token = checkpoint_saved.set(publish)
        try:
            yield
        finally:
            checkpoint_saved.reset(token)


def _replace_dir(source: Path, target: Path) -> None:
    """Move `source` to `target`, replacing what is there, never leaving `target` half-written."""
    old = target.with_name(f".{target.name}.old-{os.getpid()}")
    if target.exists():
        os.replace(target, old)
    os.replace(source, target)
    shutil.rmtree(old, ignore_errors=True)


class _Lease:
    """A lease object in the root: taken when absent, expired or ours; renewed by a thread."""

    def __init__(self, store: Store, rel: str, seconds: float = LEASE_SECONDS, poll: float = 1.0):
        self.store, self.rel, self.seconds, self.poll = store, rel, seconds, poll
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None

    def _holder(self) -> dict[str, Any] | None:
        text = self.store.read_text(self.rel)
        try:
            return json.loads(text) if text else None
        except json.JSONDecodeError:
            return None

    def _write(self) -> None:
        body = {"owner": self.owner, "expires": time.time() + self.seconds}
        self.store.fs.pipe_file(self.store._key(self.rel), json.dumps(body).encode())

    def __enter__(self) -> "_Lease":
        waited = False
        while True:
            holder = self._holder()
            if holder is None or holder.get("expires", 0) < time.time():
                self._write()
                time.sleep(min(self.poll, 0.5))  # let a racing writer land, then see who won
                if (self._holder() or {}).get("owner") == self.owner:
                    break
            elif not waited:
                log.info("stage %s is being computed by %s; waiting", self.rel, holder.get("owner"))
                waited = True
            time.sleep(self.poll)
        self._renewer = threading.Thread(target=self._renew, daemon=True, name=f"lease {self.rel}")
        self._renewer.start()
        return self

    def _renew(self) -> None:
        while not self._stop.wait(self.seconds / 3):
            try:
                self._write()
            except Exception as error:  # the stage goes on; the lease may lapse
                log.warning("could not renew lease %s: %s", self.rel, error)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join()
        if (self._holder() or {}).get("owner") == self.owner:
            with contextlib.suppress(FileNotFoundError):
                self.store.fs.rm_file(self.store._key(self.rel))


def open_store(out: "Store | str | Path", work_dir: Path | None = None) -> Store:
    """The store for an output root given as a path or URL (a Store passes through)."""
    if isinstance(out, Store):
        return out
    url = str(out)
    local = _local_path(url)
    if local is not None:
        return Store(url, local.absolute())
    import fsspec

    protocol = url.partition("://")[0]
    try:
        fsspec.get_filesystem_class(protocol)
    except (ImportError, ValueError) as error:
        raise StoreError(f"output root {url}: no fsspec file system for {protocol!r} ({error}); e.g. pip install s3fs") from error
    return Store(url, Path(work_dir or default_work_dir(url)).absolute(), remote=url)
