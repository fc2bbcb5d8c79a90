"""What a stage's identity hashes besides its config and inputs: its code and the weights it loads.

- `source_fingerprint("stages.nerf")`: a hash of the project source files the stage module imports,
  transitively within `csd/` and `stages/` (imports inside functions included), so any change to the
  code a stage runs re-plans it; there is no version number to forget to bump.
- `model_fingerprint(ModelConfig)`: the prior's weights without loading them (planning happens
  before any model loads): the snapshot commit for a model in the Hugging Face cache, or a content
  hash of the files `load_prior` reads for a local folder or a shipped short name (`toy`).
- `evaluator_fingerprint()`: the shipped toy evaluator's weights and config, for stages that judge
  their output with it (a config field `scorer` or `evaluator` set to `toy`): retrained weights
  re-score those stages.

Both hash file bytes; each file's digest is cached by (path, size, mtime), in memory and in
`$CSD_ASSET_CACHE/file-digests.json`, so a multi-GB local model is read once, not at every plan.
"""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import json
import logging
import threading
from pathlib import Path
from typing import Any

from csd.models import SHORT_NAMES, ModelConfig, resolve_model_path
from csd.prompts import cache_root
from stages.common import atomic_write_text

log = logging.getLogger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parents[1]
"""The folder holding the `csd` and `stages` packages (the repository, or site-packages)."""
CODE_PACKAGES = ("csd", "stages")
"""Packages whose modules count as a stage's code; third-party libraries are pinned by the environment."""


class _DigestCache:
    """sha256 of files, keyed by (resolved path, size, mtime): a file is read again only when it changes."""

    def __init__(self):
        self._memory: dict[str, str] = {}
        self._loaded_from: Path | None = None

    def _file(self) -> Path:
        return cache_root() / "file-digests.json"

    def _load(self) -> None:
        path = self._file()
        if self._loaded_from == path:
            return
        self._loaded_from = path
        try:
            self._memory.update(json.loads(path.read_text()))
        except (OSError, ValueError):
            pass

    def digest(self, path: Path) -> str:
        path = Path(path).resolve()
        stat = path.stat()
        key = f"{path}:{stat.st_size}:{stat.st_mtime_ns}"
        if key not in self._memory:
            self._load()
        if key not in self._memory:
            digest = hashlib.sha256()
            with path.open("rb") as handle:
                for block in iter(lambda: handle.read(1 << 24), b""):
                    digest.update(block)
            self._memory[key] = digest.hexdigest()
            if stat.st_size >= 1 << 24:  # only big files are worth a write; small ones re-hash in microseconds
                self._save()
        return self._memory[key]

    def _save(self) -> None:
        path = self._file()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(path, json.dumps(self._memory))
        except OSError as error:  # a read-only cache only costs a re-hash next time
            log.warning("cannot save file digests to %s: %s", path, error)


_DIGESTS = _DigestCache()


def file_digest(path: Path) -> str:
    """sha256 hex digest of the file's bytes (cached by path, size and mtime)."""
    return _DIGESTS.digest(Path(path))


# --- code --------------------------------------------------------------------------------------


def _module_file(name: str, root: Path) -> Path | None:
    base = root.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


_IMPORTS: dict[tuple[str, str, int, int], frozenset[str]] = {}
"""Parsed imports by (module, path, size, mtime): planning a catalog parses each source file once."""


def _imported_names(file: Path, module: str) -> frozenset[str]:
    """Absolute names of every module (or module attribute) `file` imports, anywhere in it."""
    stat = file.stat()
    key = (module, str(file), stat.st_size, stat.st_mtime_ns)
    if key not in _IMPORTS:
        _IMPORTS[key] = frozenset(_parse_imports(file, module))
    return _IMPORTS[key]


_PARSE_LOCK = threading.Lock()
"""CPython 3.11 keeps the AST constructor's recursion depth per interpreter, not per thread: two threads
building ASTs at once raise `SystemError: AST constructor recursion depth mismatch` (python/cpython
gh-106905). Assets planned in threads parse under this lock."""


def _parse(file: Path) -> ast.Module:
    source = file.read_bytes()
    with _PARSE_LOCK:
        try:
            return ast.parse(source, filename=str(file))
        except SystemError:
            # another library (Prefect's docstring parser, pytest's rewriter) built an AST in a thread at
            # the same moment: the parse itself was fine, the shared depth counter was not; parse again
            return ast.parse(source, filename=str(file))


def _parse_imports(file: Path, module: str) -> set[str]:
    package = module if file.name == "__init__.py" else module.rpartition(".")[0]
    names: set[str] = set()
    for node in ast.walk(_parse(file)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1])
                base = f"{base}.{node.module}" if node.module else base
            else:
                base = node.module or ""
            # `from csd import models` imports a module; `from csd.models import X` an attribute
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def source_files(module: str, root: Path | None = None) -> list[Path]:
    """The project files `module` runs: itself, the packages above it, and every `csd`/`stages`
    module it imports, transitively (sorted)."""
    root = Path(root) if root is not None else PROJECT_ROOT
    seen: dict[str, Path] = {}
    queue = [module]
    while queue:
        name = queue.pop()
        parts = name.split(".")
        if parts[0] not in CODE_PACKAGES:
            continue
        # importing a.b.c runs a/__init__.py and a/b/__init__.py first
        for depth in range(1, len(parts) + 1):
            prefix = ".".join(parts[:depth])
            if prefix in seen:
                continue
            file = _module_file(prefix, root)
            if file is None:
                continue  # an attribute (`csd.models.ModelConfig`), not a module
            seen[prefix] = file
            queue.extend(_imported_names(file, prefix))
    if module not in seen:
        raise ModuleNotFoundError(f"no source file for module {module!r} under {root}")
    return sorted(set(seen.values()))


def source_fingerprint(module: str, root: Path | None = None) -> str:
    """Hash of the source files `module` runs (`source_files`), by relative path and content."""
    root = Path(root) if root is not None else PROJECT_ROOT
    digest = hashlib.sha256()
    for file in source_files(module, root):
        digest.update(f"{file.relative_to(root).as_posix()}\0{file_digest(file)}\n".encode())
    return digest.hexdigest()[:16]


# --- weights -----------------------------------------------------------------------------------


def _model_files(path: Path) -> list[Path]:
    """What `load_prior` reads from a diffusers folder: `model_index.json` and the component folders it names."""
    index = json.loads((path / "model_index.json").read_text())
    components = sorted(name for name, value in index.items() if not name.startswith("_") and isinstance(value, list))
    files = [path / "model_index.json"]
    for name in components:
        files += sorted(f for f in (path / name).rglob("*") if f.is_file())
    return files


def _hub_snapshot(model: str, revision: str | None) -> str | None:
    """The commit of the cached snapshot of hub id `model` at `revision`, or None when not cached."""
    from huggingface_hub import snapshot_download

    try:
        # local_files_only: resolves the revision through the cache's refs, never touches the network
        path = snapshot_download(model, revision=revision, allow_patterns=["model_index.json"], local_files_only=True)
    except Exception:
        return None
    return Path(path).name


_WARNED: set[str] = set()


def model_fingerprint(config: ModelConfig) -> str:
    """Names the prior's weights without loading them: `hub:<commit>` for a cached hub snapshot,
    `sha256:<digest>` of the files loaded for a local folder or shipped short name."""
    name = config.model
    if name in SHORT_NAMES or Path(name).expanduser().exists():
        path = resolve_model_path(name, config.revision)
        digest = hashlib.sha256()
        for file in _model_files(path):
            digest.update(f"{file.relative_to(path).as_posix()}\0{file_digest(file)}\n".encode())
        return f"sha256:{digest.hexdigest()[:16]}"
    commit = _hub_snapshot(name, config.revision)
    if commit is None:
        # not cached yet: the run downloads it (unless offline) and the next plan names its commit
        if name not in _WARNED:
            _WARNED.add(name)
            log.warning("model %r is not in the Hugging Face cache; its stages are identified by name until it is", name)
        return f"hub:{name}@{config.revision or 'main'}:not-cached"
    return f"hub:{commit}"


EVALUATOR_FIELDS = ("scorer", "evaluator")
"""Config fields that name the judge of a stage's output; the value `toy` is the shipped toy evaluator."""


def evaluator_fingerprint() -> str:
    """`sha256:<digest>` of the toy evaluator's files (`csd/toy/evaluator.safetensors` and its `.json`),
    without loading it; `missing` when they are not there (the stage's own check reports that)."""
    weights = PROJECT_ROOT / "csd" / "toy" / "evaluator.safetensors"
    files = [weights, weights.with_suffix(".json")]
    if not all(f.is_file() for f in files):
        return "missing"
    digest = hashlib.sha256()
    for file in files:
        digest.update(f"{file.name}\0{file_digest(file)}\n".encode())
    return f"sha256:{digest.hexdigest()[:16]}"


def weights_fingerprints(config: Any) -> dict[str, str]:
    """`{field path: fingerprint}` for every `ModelConfig` inside the config dataclass `config`
    (`model_fingerprint`) and every judge field (`EVALUATOR_FIELDS`) set to `toy` (`evaluator_fingerprint`)."""
    found: dict[str, str] = {}

    def visit(value: Any, where: str) -> None:
        if isinstance(value, ModelConfig):
            found[where] = model_fingerprint(value)
        elif dataclasses.is_dataclass(value) and not isinstance(value, type):
            for f in dataclasses.fields(value):
                path = f"{where}.{f.name}" if where else f.name
                if f.name in EVALUATOR_FIELDS and getattr(value, f.name) == "toy":
                    found[path] = f"toy-evaluator:{evaluator_fingerprint()}"
                else:
                    visit(getattr(value, f.name), path)

    visit(config, "")
    return found
