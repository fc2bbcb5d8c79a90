"""CSV prompt catalogs: one row per asset, checked in full before any work starts.

Columns (schema in `catalogs/README.md`): `asset_id` and `prompt` are required; `negative_prompt`,
`seed`, `preset`, `edit_prompt` and `mesh` are optional; any `<section>.<field>` column (e.g.
`nerf.steps`, `model.model`) overrides that field of the stage config for its row. Files may be
UTF-8 with or without a BOM, with LF or CRLF line ends, and prompts may hold quoted commas and newlines.

`read_catalog` collects every problem (line, column, value) instead of stopping at the first, so
a user fixes a catalog in one pass (`flows.pipeline.load_catalog` adds the config checks and raises
them all in one `CatalogError`).
"""

from __future__ import annotations

import csv
import hashlib
import io
import re
from collections.abc import Callable, Collection
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from stages.config import ConfigError, load_preset

REQUIRED_COLUMNS = ("asset_id", "prompt")
OPTIONAL_COLUMNS = ("negative_prompt", "seed", "preset", "edit_prompt", "mesh")
MESH_SUFFIXES = (".obj", ".ply", ".stl", ".off", ".glb", ".gltf")
"""Formats trimesh reads; the `mesh` stage loads a user mesh with trimesh."""
MAX_SEED = 2**32 - 1
RESERVED_IDS = ("mlflow.db", "mlartifacts")
"""Names the output root uses for itself; an asset folder must not collide with them."""
_ASSET_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


class CatalogError(ValueError):
    """A catalog has problems; `problems` lists each one as a full sentence."""

    def __init__(self, path: Path, problems: list[str]):
        self.path = Path(path)
        self.problems = problems
        super().__init__(f"{path}: {len(problems)} problem(s):\n" + "\n".join(f"  - {p}" for p in problems))


@dataclass(frozen=True)
class CatalogRow:
    """One asset to make. `mesh` is an absolute path (texture-only row) or None; `overrides` maps
    dotted config keys (`nerf.steps`) to the cells as written; the planner converts them to the field's type."""

    asset_id: str
    prompt: str
    negative_prompt: str = ""
    seed: int = 0
    preset: str | None = None
    edit_prompt: str | None = None
    mesh: str | None = None
    overrides: dict[str, Any] = field(default_factory=dict)
    line: int = 0
    """Line of the file where the row starts (the header is line 1)."""

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe form, e.g. for Prefect flow-run parameters."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "CatalogRow":
        return cls(**data)


@dataclass(frozen=True)
class Catalog:
    path: Path
    rows: list[CatalogRow]
    fingerprint: str
    """sha256 of the file's bytes (first 16 hex digits): names this version of the catalog."""

    def select(self, only: Collection[str] | None) -> list[CatalogRow]:
        """The rows whose `asset_id` is in `only` (all rows when `only` is empty)."""
        if not only:
            return list(self.rows)
        known = {row.asset_id for row in self.rows}
        missing = sorted(set(only) - known)
        if missing:
            raise CatalogError(self.path, [f"--only names asset(s) not in the catalog: {', '.join(missing)}"])
        return [row for row in self.rows if row.asset_id in set(only)]


def location(line: int, column: str | None = None, asset_id: str | None = None) -> str:
    """Where a catalog message points: `line 3, column 'nerf.steps' (asset 'red')`."""
    return f"line {line}" + (f", column {column!r}" if column else "") + (f" (asset {asset_id!r})" if asset_id else "")


def _asset_id_problem(value: str) -> str | None:
    if not value:
        return "is empty"
    if "/" in value or "\\" in value:
        return "contains a path separator"
    if ".." in value:
        return "contains '..'"
    if value in RESERVED_IDS:
        return f"is reserved for the output root ({', '.join(RESERVED_IDS)})"
    if not _ASSET_ID.fullmatch(value):
        return "must be 1-100 characters from letters, digits, '.', '_', '-', starting with a letter or digit"
    return None


def _preset_reference(value: str, base: Path) -> str | None:
    """A shipped preset name as is; a YAML path made absolute against the catalog's folder."""
    if not value:
        return None
    return str((base / value).resolve()) if Path(value).suffix else value


def read_catalog(path: Path, check_override: Callable[[str], str | None]) -> tuple[Catalog, list[str]]:
    """Parse and check the catalog at `path`: the rows without problems, and every problem found.

    Raises `CatalogError` only when nothing further can be checked (unreadable, not UTF-8, no header,
    a required column missing). `check_override(column)` says why a `<section>.<field>` column names
    no config field (or None); such a column is reported once and left out of the rows."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as error:
        raise CatalogError(path, [f"cannot read the catalog: {error.strerror}"]) from error
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        raise CatalogError(path, [f"line {line}: not UTF-8 (byte {data[error.start]:#04x} at offset {error.start})"]) from error

    problems: list[str] = []
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = [name.strip() for name in next(reader)]
    except StopIteration:
        raise CatalogError(path, ["the file is empty; expected a header with at least: " + ", ".join(REQUIRED_COLUMNS)]) from None

    known = set(REQUIRED_COLUMNS) | set(OPTIONAL_COLUMNS)
    for name in REQUIRED_COLUMNS:
        if name not in header:
            problems.append(f"header: missing required column {name!r}")
    overrides: list[str] = []
    for index, name in enumerate(header):
        if header.index(name) != index:
            problems.append(f"header: column {name!r} appears more than once")
        elif "." in name:
            problem = check_override(name)
            problems += [problem] if problem else []
            overrides += [] if problem else [name]
        elif name not in known:
            valid = ", ".join((*REQUIRED_COLUMNS, *OPTIONAL_COLUMNS))
            problems.append(f"header: unknown column {name!r}; valid: {valid}, or <section>.<field> config overrides")
    if any(name not in header for name in REQUIRED_COLUMNS):
        raise CatalogError(path, problems)

    rows: list[CatalogRow] = []
    first_line: dict[str, int] = {}
    line = reader.line_num
    for cells in reader:
        start, line = line + 1, reader.line_num
        if not any(cell.strip() for cell in cells):
            continue
        if len(cells) != len(header):
            problems.append(f"line {start}: has {len(cells)} values but the header has {len(header)} columns")
            continue
        values = {name: cell.strip() for name, cell in zip(header, cells)}
        row_problems = _check_row(values, start, path.parent, first_line)
        first_line.setdefault(values["asset_id"], start)
        problems += row_problems
        if row_problems:
            continue
        rows.append(
            CatalogRow(
                asset_id=values["asset_id"],
                prompt=values["prompt"],
                negative_prompt=values.get("negative_prompt", ""),
                seed=int(values.get("seed") or 0),
                preset=_preset_reference(values.get("preset", ""), path.parent),
                edit_prompt=values.get("edit_prompt") or None,
                mesh=str((path.parent / values["mesh"]).resolve()) if values.get("mesh") else None,
                overrides={name: values[name] for name in overrides if values[name]},
                line=start,
            )
        )
    if not rows and not problems:
        problems.append("no rows: the catalog has a header but no assets")
    return Catalog(path=path, rows=rows, fingerprint=hashlib.sha256(data).hexdigest()[:16]), problems


def _check_row(values: dict[str, str], line: int, base: Path, first_line: dict[str, int]) -> list[str]:
    problems = []
    asset_id = values["asset_id"]
    reason = _asset_id_problem(asset_id)

    def problem(column: str, message: str) -> None:
        # a problem with the asset id quotes it; the other ones name the row by it
        problems.append(f"{location(line, column, None if column == 'asset_id' or reason else asset_id)}: {message}")

    if reason:
        problem("asset_id", f"{asset_id!r} {reason}")
    elif asset_id in first_line:
        problem("asset_id", f"{asset_id!r} duplicates the asset on line {first_line[asset_id]}")
    if not values["prompt"]:
        problem("prompt", "is empty; every asset needs a prompt")
    seed = values.get("seed", "")
    if seed and not (seed.isdigit() and int(seed) <= MAX_SEED):
        problem("seed", f"{seed!r} is not a whole number from 0 to {MAX_SEED}")
    preset = _preset_reference(values.get("preset", ""), base)
    if preset:
        try:
            load_preset(preset)
        except ConfigError as error:
            problem("preset", str(error))
    mesh = values.get("mesh", "")
    if mesh:
        mesh_path = base / mesh
        if not mesh_path.is_file():
            problem("mesh", f"file {mesh!r} does not exist (looked for {mesh_path.resolve()})")
        elif mesh_path.suffix.lower() not in MESH_SUFFIXES:
            problem("mesh", f"{mesh!r} is not a mesh format trimesh reads ({', '.join(MESH_SUFFIXES)})")
        else:
            from stages.mesh import load_user_mesh  # what the mesh stage will do with it

            try:
                load_user_mesh(mesh_path, up="z")
            except Exception as error:  # trimesh raises many kinds for a broken file
                problem("mesh", f"{mesh!r} cannot be loaded as a mesh ({type(error).__name__}: {error}); expected one of "
                        f"{', '.join(MESH_SUFFIXES)} with at least one triangle")
    if values.get("edit_prompt") and values["edit_prompt"] == values["prompt"]:
        problem("edit_prompt", "equals the prompt; an edit needs a different target description")
    return problems
