"""What every stage shares: atomic stage directories, the result record, checkpoints, previews.

A stage writes into `<stage>.partial/` next to its final directory; checkpoints live there too, so a
crashed run resumes from them. Only when every output is written does `StageWorkspace.commit`
write `result.json` and rename the directory into place (replacing an older result only then), so
a crash never leaves a half stage that looks done and never loses what was there before.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import logging
import os
import random
import shutil
import socket
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch

log = logging.getLogger(__name__)

StepCallback = Optional[Callable[[int, dict[str, float]], None]]
"""Called by long stage loops with (step, metrics), after the step and before its checkpoint is saved
(an object-store root uploads checkpoints from it, `flows.store`)."""

RESULT_FILE = "result.json"


@dataclass
class StageResult:
    """What a finished stage reports: files (relative to `directory`), metrics, timings in seconds."""

    stage: str
    directory: str
    outputs: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    previews: list[str] = field(default_factory=list)
    identity: str = ""
    committed_at: float = 0.0
    """Seconds since the epoch when the stage was committed (copies of the directory keep it)."""
    memory: dict[str, float] = field(default_factory=dict)
    """Peak memory of the stage in MiB (`peak_memory`), recorded at commit."""

    def path(self, name: str) -> Path:
        """Absolute path of output `name`."""
        if name not in self.outputs:
            raise KeyError(f"stage {self.stage!r} has no output {name!r}; it has {', '.join(self.outputs)}")
        return Path(self.directory) / self.outputs[name]

    @classmethod
    def load(cls, directory: Path) -> "StageResult":
        return cls.from_json((Path(directory) / RESULT_FILE).read_text(), directory)

    @classmethod
    def from_json(cls, text: str, directory: Path) -> "StageResult":
        """The result a `result.json` text describes, for the stage directory `directory`."""
        data = json.loads(text)
        known = {f.name for f in dataclasses.fields(cls)}
        # a shared root adds its own keys (the file manifest)
        return cls(**{k: v for k, v in data.items() if k in known and k != "directory"}, directory=str(directory))


def completed(directory: Path, identity: str | None = None) -> StageResult | None:
    """The result of a completed stage in `directory` (matching `identity` when given), else None."""
    try:
        result = StageResult.load(directory)
    except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError, TypeError):
        return None
    if identity is not None and result.identity != identity:
        return None
    return result


class StageWorkspace:
    """`with StageWorkspace(final_dir, "nerf", identity) as ws:` — write into `ws.path`, then `ws.commit(result)`.

    The `.partial` directory survives a crash (it holds checkpoints); it is reused only when it was
    started for the same identity, otherwise it is cleared.
    """

    def __init__(self, directory: Path, stage: str, identity: str = ""):
        self.final = Path(directory)
        self.stage = stage
        self.identity = identity
        self.path = self.final.with_name(self.final.name + ".partial")
        self._committed = False

    def __enter__(self) -> "StageWorkspace":
        marker = self.path / "identity.txt"
        if self.path.exists() and (not marker.exists() or marker.read_text() != self.identity):
            log.info("clearing stale partial stage %s", self.path)
            shutil.rmtree(self.path)
        self.path.mkdir(parents=True, exist_ok=True)
        marker.write_text(self.identity)
        reset_peak_memory()
        return self

    def commit(self, result: StageResult) -> StageResult:
        """Write `result.json` and move the directory into place atomically."""
        result.identity = self.identity
        result.directory = str(self.final)
        result.committed_at = time.time()
        result.memory = peak_memory()
        payload = asdict(result)
        payload.pop("directory")
        atomic_write_text(self.path / RESULT_FILE, json.dumps(payload, indent=2))
        (self.path / "identity.txt").unlink(missing_ok=True)
        old = self.final.with_name(f".{self.final.name}.old-{os.getpid()}")
        if self.final.exists():
            os.replace(self.final, old)
        os.replace(self.path, self.final)
        shutil.rmtree(old, ignore_errors=True)
        self._committed = True
        return result

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None and not self._committed:
            raise RuntimeError(f"stage {self.stage} finished without committing its result")


@contextlib.contextmanager
def stage_lock(directory: Path, timeout: float | None = None):
    """Exclusive lock on a stage directory (`<stage>.lock` next to it), across processes and machines
    sharing a POSIX file system, so two batches never run the same stage at once; the second one
    then finds the stage completed and reuses it. Waits up to `timeout` seconds (None: forever)."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    lock_path = directory.with_name(directory.name + ".lock")
    deadline = None if timeout is None else time.monotonic() + timeout
    with open(lock_path, "a+") as handle:
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if deadline is not None and time.monotonic() > deadline:
                    raise TimeoutError(f"stage {directory} is locked by another run (lock file {lock_path})") from None
                time.sleep(0.2)
        try:
            handle.seek(0)
            handle.truncate()
            handle.write(f"{socket.gethostname()} pid {os.getpid()}\n")
            handle.flush()
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


class TrainingCheckpoint:
    """The resumable state of a stage's optimisation loop in `<work>/checkpoint.pt`: step, metric
    history, the torch generator and Python RNG, plus whatever `state_dict`s the stage names."""

    def __init__(self, work: Path, generator: torch.Generator, rng: random.Random):
        self.path = Path(work) / "checkpoint.pt"
        self.generator, self.rng = generator, rng

    def load(self, device) -> tuple[dict[str, Any], int, list[dict[str, float]]] | None:
        """The saved state dicts, step and history (generator and RNG restored), or None."""
        if not self.path.exists():
            return None
        state = torch.load(self.path, map_location=device, weights_only=False)
        self.generator.set_state(state.pop("generator"))
        self.rng.setstate(state.pop("rng"))
        return state, state.pop("step"), state.pop("history")

    def save(self, step: int, history: list[dict[str, float]], **state: Any) -> None:
        payload = {**state, "generator": self.generator.get_state(), "rng": self.rng.getstate(), "step": step, "history": history}
        atomic_save(lambda p: torch.save(payload, p), self.path)

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


def reset_peak_memory() -> None:
    """Start a new peak-memory window for this process (a stage's `StageWorkspace` does, on entry).

    CPU: resets the kernel's resident-set high-water mark (Linux `/proc/self/clear_refs`); CUDA:
    `torch.cuda.reset_peak_memory_stats` on every device once CUDA is initialised."""
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for device in range(torch.cuda.device_count()):
            torch.cuda.reset_peak_memory_stats(device)


def peak_memory() -> dict[str, float]:
    """Peak memory since `reset_peak_memory`, in MiB: every stage's `result.json` `memory`.

    `peak_rss_mb`: the process's resident-set high-water mark (VmHWM; where it cannot be reset or
    read, the process's lifetime peak `ru_maxrss`); assets run as threads of one process share it.
    `peak_cuda_allocated_mb` (when CUDA was used): `torch.cuda.max_memory_allocated`, the largest
    over devices."""
    peak_kib = None
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                peak_kib = float(line.split()[1])
    if peak_kib is None:
        import resource

        peak_kib = float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    memory = {"peak_rss_mb": peak_kib / 1024}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        memory["peak_cuda_allocated_mb"] = max(torch.cuda.max_memory_allocated(d) for d in range(torch.cuda.device_count())) / 2**20
    return memory


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{socket.gethostname()}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def atomic_save(save: Callable[[Path], None], path: Path) -> None:
    """Call `save(tmp_path)` then rename to `path` (checkpoints, weights)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp{path.suffix}")
    save(tmp)
    os.replace(tmp, path)


class Timer:
    """Accumulates wall time per named section: `with timer("render"): ...`."""

    def __init__(self):
        self.totals: dict[str, float] = {}

    def __call__(self, name: str):
        timer = self

        class _Section:
            def __enter__(self):
                self.start = time.perf_counter()

            def __exit__(self, *exc):
                timer.totals[name] = timer.totals.get(name, 0.0) + time.perf_counter() - self.start

        return _Section()


def to_uint8(images) -> np.ndarray:
    """`(B, 3, H, W)` tensor or `(B, H, W, 3)` array in [0, 1] → `(B, H, W, 3)` uint8."""
    array = images.detach().cpu().float().numpy() if hasattr(images, "detach") else np.asarray(images)
    if array.ndim == 4 and array.shape[1] in (3, 4) and array.shape[-1] not in (3, 4):
        array = array.transpose(0, 2, 3, 1)
    return (np.clip(array, 0, 1) * 255).round().astype(np.uint8)


def upscale(frames: np.ndarray, size: int) -> np.ndarray:
    """Nearest-neighbour upscale `(B, H, W, 3)` frames to at least `size` pixels high."""
    factor = max(1, int(np.ceil(size / frames.shape[1])))
    return frames.repeat(factor, axis=1).repeat(factor, axis=2)


def contact_sheet(frames: np.ndarray, columns: int = 4) -> np.ndarray:
    """`(B, H, W, 3)` → one image with the frames in a grid."""
    b, h, w, c = frames.shape
    rows = int(np.ceil(b / columns))
    sheet = np.full((rows * h, columns * w, c), 255, dtype=np.uint8)
    for i, frame in enumerate(frames):
        r, col = divmod(i, columns)
        sheet[r * h : (r + 1) * h, col * w : (col + 1) * w] = frame
    return sheet


def write_previews(frames, directory: Path, name: str = "turntable", size: int = 256, columns: int = 4) -> list[str]:
    """Turntable frames `(B, 3, H, W)` in [0, 1] → `<name>.png` (contact sheet) and `<name>.gif`."""
    import imageio.v3 as iio

    array = upscale(to_uint8(frames), size)
    iio.imwrite(directory / f"{name}.png", contact_sheet(array, columns))
    iio.imwrite(directory / f"{name}.gif", array, duration=100, loop=0)
    return [f"{name}.png", f"{name}.gif"]


def json_ready(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if v is not None}
