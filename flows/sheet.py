"""The batch contact sheet: every asset of an output root in one PNG, for a reviewer who would
otherwise open one MLflow run per asset.

Each cell is the asset's final preview (the export's `preview.png`, else the turntable of the last
finished stage), its id, its state (the first failed stage in red) and the quality numbers of its
`card.json`. Logged to the batch's MLflow run and written by `csd-asset status --sheet FILE`.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from flows.pipeline import STAGE_NAMES, stage_states
from flows.store import Store, open_store
from stages.common import atomic_save

TILE = (256, 128)
"""(width, height) of a cell's picture; the export preview is 4 × 2 views."""
LABEL_HEIGHT = 66
"""Id, state and up to three lines of numbers (one per scored prompt)."""
SHORT = {"shape_iou": "IoU", "colour_error": "colour err"}
ROLES = {"prompt": "prompt", "edit_prompt": "edit"}
FAILED = (200, 30, 30)


@dataclass
class SheetEntry:
    asset_id: str
    state: str
    """`done`, `failed at <stage>`, `running`, …"""
    failed: bool
    picture: np.ndarray | None
    """`(H, W, 3)` uint8, or None when no stage has a preview yet."""
    numbers: list[str] = field(default_factory=list)


def _image(store: Store, rel: str) -> np.ndarray | None:
    from PIL import Image

    data = store.read_bytes(rel)
    return None if data is None else np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def _numbers(card: dict) -> list[str]:
    """Short `role: name value` strings from a card's quality section."""
    numbers = []
    for role, quality in card.get("quality", {}).items():
        values = [f"{quality.get('scorer', 'score')} {quality['score']:.2f}"] if "score" in quality else []
        values += [f"{short} {quality[key]:.2f}" for key, short in SHORT.items() if isinstance(quality.get(key), (int, float))]
        if values:
            numbers.append(f"{ROLES.get(role, role)}: " + ", ".join(values))
    return numbers


def sheet_entries(out: Store | str | Path, asset_ids: list[str] | None = None) -> list[SheetEntry]:
    store = open_store(out)
    table = stage_states(store)
    entries = []
    for asset_id in asset_ids or sorted(table):
        states = table.get(asset_id, {})
        failed = [name for name in STAGE_NAMES if states.get(name) == "failed"]
        if failed:
            state = f"failed at {failed[0]}"
        elif states and all(value == "done" for value in states.values()):
            state = "done"
        else:
            state = ", ".join(sorted({value for value in states.values() if value != "done"})) or "not run"
        done = [name for name in STAGE_NAMES if states.get(name) == "done"]
        picture = _image(store, f"{asset_id}/export/preview.png") if "export" in done else None
        for name in reversed(done):
            if picture is not None:
                break
            picture = _image(store, f"{asset_id}/{name}/turntable.png")
        card = json.loads(store.read_text(f"{asset_id}/export/card.json") or "{}") if "export" in done else {}
        entries.append(SheetEntry(asset_id, state, bool(failed), picture, _numbers(card)))
    return entries


def _fit(picture: np.ndarray) -> np.ndarray:
    """`picture` scaled into a TILE box on white, aspect kept."""
    from PIL import Image

    width, height = TILE
    image = Image.fromarray(picture)
    scale = min(width / image.width, height / image.height)
    image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))), Image.LANCZOS)
    canvas = Image.new("RGB", TILE, (255, 255, 255))
    canvas.paste(image, ((width - image.width) // 2, (height - image.height) // 2))
    return np.asarray(canvas)


def render_sheet(entries: list[SheetEntry], columns: int = 4) -> np.ndarray:
    """One `(H, W, 3)` uint8 grid: per entry its picture, id, state and numbers; failed cells framed red."""
    from PIL import Image, ImageDraw

    if not entries:
        raise ValueError("no assets to put on a contact sheet")
    width, height = TILE
    cell_height = height + LABEL_HEIGHT
    columns = min(columns, len(entries))
    rows = -(-len(entries) // columns)
    sheet = Image.new("RGB", (columns * width, rows * cell_height), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for index, entry in enumerate(entries):
        x, y = (index % columns) * width, (index // columns) * cell_height
        if entry.picture is not None:
            sheet.paste(Image.fromarray(_fit(entry.picture)), (x, y))
        else:
            draw.text((x + 8, y + height // 2 - 6), "no preview", fill=(120, 120, 120))
        colour = FAILED if entry.failed else (0, 0, 0)
        draw.text((x + 4, y + height + 2), entry.asset_id, fill=(0, 0, 0))
        draw.text((x + 4, y + height + 14), entry.state, fill=colour)
        for line, numbers in enumerate(entry.numbers[:3]):
            draw.text((x + 4, y + height + 26 + 12 * line), numbers[:44], fill=(60, 60, 60))
        if entry.failed:
            draw.rectangle((x, y, x + width - 1, y + cell_height - 1), outline=FAILED, width=4)
    return np.asarray(sheet)


def write_sheet(out: Store | str | Path, path: Path, asset_ids: list[str] | None = None) -> list[SheetEntry]:
    """Write the contact sheet of `asset_ids` (default: every asset under `out`) to the PNG `path`."""
    import imageio.v3 as iio

    entries = sheet_entries(out, asset_ids)
    image = render_sheet(entries)
    atomic_save(lambda tmp: iio.imwrite(tmp, image), Path(path))
    return entries
