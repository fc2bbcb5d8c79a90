"""Per-step cost of the `nerf` and `texture` stages against their guidance UNet (CPU, toy prior).

    python bench/step_cost.py                          # toy-cpu, demo rows "a red cube" / "a blue sphere"
    python bench/step_cost.py --nerf-steps 300 --texture-steps 100 --threads 1
    python bench/step_cost.py --set nerf.renderer.num_samples=32

Runs the real stages (`stages.nerf.run`, `stages.texture.run`) for a few steps each, in one process,
and times the calls every step makes by wrapping them: the renderer, the UNet
(`DiffusionPrior.predict_noise`), the rest of the guidance (encode, prompts, noise, the classifier
score), `Tensor.backward` and `Optimizer.step`. Times are exclusive (the UNet is not counted again in
the guidance); "other" is the step's wall time (callback to callback) minus all of them. Steps before
`--warmup` are left out. The printed ratio step time / UNet time is the issue-20 bar (≤ 1.6×): the
UNet call is the one part no implementation of the method can avoid.

The texture stage refines a grey UV-unwrapped icosphere of 5120 faces (the `mesh` stage's toy-cpu
`target_faces` is 5000); pass `--texture-input` to use a real `uv` stage directory instead.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from csd.guidance import ScoreDistillation  # noqa: E402
from csd.models import DiffusionPrior  # noqa: E402
from csd.raster import MeshRenderer  # noqa: E402
from csd.renderer import VolumeRenderer  # noqa: E402
from stages.assets import TexturedMesh, write_textured_mesh  # noqa: E402
from stages.config import build_config, load_preset  # noqa: E402

PARTS = ("render", "guidance (rest)", "UNet", "backward", "optimizer", "other")


class Probe:
    """Exclusive wall time per label of the wrapped callables, accumulated until `take()`."""

    def __init__(self):
        self.totals: dict[str, float] = defaultdict(float)
        self._stack: list[list] = []  # [label, started, child time]
        self._patches: list[tuple[object, str, object]] = []

    def wrap(self, owner, name: str, label: str) -> None:
        original = getattr(owner, name)
        probe = self

        def timed(*args, **kwargs):
            frame = [label, time.perf_counter(), 0.0]
            probe._stack.append(frame)
            try:
                return original(*args, **kwargs)
            finally:
                probe._stack.pop()
                inclusive = time.perf_counter() - frame[1]
                probe.totals[label] += inclusive - frame[2]
                if probe._stack:
                    probe._stack[-1][2] += inclusive

        setattr(owner, name, timed)
        self._patches.append((owner, name, original))

    def take(self) -> dict[str, float]:
        totals, self.totals = dict(self.totals), defaultdict(float)
        return totals

    def restore(self) -> None:
        for owner, name, original in reversed(self._patches):
            setattr(owner, name, original)
        self._patches.clear()


@contextlib.contextmanager
def probed(render_calls: list[tuple[object, str]]):
    probe = Probe()
    for owner, name in render_calls:
        probe.wrap(owner, name, "render")
    probe.wrap(DiffusionPrior, "predict_noise", "UNet")
    probe.wrap(DiffusionPrior, "encode_images", "guidance (rest)")
    probe.wrap(ScoreDistillation, "__call__", "guidance (rest)")
    probe.wrap(torch.Tensor, "backward", "backward")
    probe.wrap(torch.optim.Adam, "step", "optimizer")
    try:
        yield probe
    finally:
        probe.restore()


class StepRecorder:
    """The stage callback: one row of part times per step, from the probe's totals since the last step."""

    def __init__(self, probe: Probe):
        self.probe, self.rows, self.last = probe, [], None

    def __call__(self, step: int, metrics: dict[str, float]) -> None:
        now = time.perf_counter()
        parts = self.probe.take()
        if self.last is not None:
            row = {p: parts.get(p, 0.0) for p in PARTS[:-1]}
            row["step"] = now - self.last
            row["other"] = row["step"] - sum(row[p] for p in PARTS[:-1])
            self.rows.append(row)
        self.last = now


def grey_icosphere(directory: Path, subdivisions: int = 4, size: int = 256) -> Path:
    """A `uv`-stage hand-off: an xatlas-unwrapped icosphere with a mid-grey texture."""
    import trimesh
    import xatlas

    mesh = trimesh.creation.icosphere(subdivisions=subdivisions, radius=0.6)
    mapping, faces, uvs = xatlas.parametrize(mesh.vertices, mesh.faces)
    directory.mkdir(parents=True, exist_ok=True)
    write_textured_mesh(TexturedMesh(mesh.vertices[mapping], faces, uvs, np.full((size, size, 3), 128, np.uint8)), directory)
    return directory


def measure(stage: str, config, out: Path, inputs: dict[str, Path], warmup: int) -> dict[str, float]:
    if stage == "nerf":
        from stages.nerf import run

        calls = [(VolumeRenderer, "render")]
    else:
        from stages.texture import TextureImage, run

        calls = [(MeshRenderer, "rasterize"), (MeshRenderer, "uv"), (TextureImage, "sample"), (MeshRenderer, "shade")]
    with probed(calls) as probe:
        recorder = StepRecorder(probe)
        run(config, out, inputs=inputs, callback=recorder)
    rows = recorder.rows[warmup:]
    if not rows:
        raise SystemExit(f"{stage}: no steps after the {warmup} warm-up steps; raise --{stage}-steps")
    return {key: float(np.mean([r[key] for r in rows])) for key in ("step", *PARTS)} | {"steps": len(rows)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="toy-cpu")
    parser.add_argument("--nerf-steps", type=int, default=100,
                        help="the preset's albedo-only phase is scaled to the same share of these steps")
    parser.add_argument("--texture-steps", type=int, default=40, help="0 skips the stage (likewise --nerf-steps)")
    parser.add_argument("--warmup", type=int, default=5, help="first steps left out of the means")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--texture-input", type=Path, help="a uv stage directory (default: a grey 5120-face icosphere)")
    parser.add_argument("--set", action="append", default=[], metavar="STAGE.FIELD=VALUE")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    from stages.nerf import NerfConfig
    from stages.texture import TextureConfig

    preset = load_preset(args.preset)
    overrides = defaultdict(dict)
    for pair in args.set:
        key, value = pair.split("=", 1)
        stage, field = key.split(".", 1)
        overrides[stage][field] = yaml.safe_load(value)
    root = Path(tempfile.mkdtemp(prefix="csd-step-cost-"))
    texture_input = args.texture_input or (grey_icosphere(root / "uv") if args.texture_steps else None)
    # the preset's share of albedo-only steps, so a short run mixes shading modes as a full one does
    nerf_preset = preset.get("nerf", {})
    ambient = round(args.nerf_steps * nerf_preset.get("ambient_only_steps", 0) / nerf_preset.get("steps", args.nerf_steps))
    runs = {
        "nerf": (NerfConfig, {"prompt": "a red cube", "seed": 0, "steps": args.nerf_steps, "preview_views": 4,
                              "ambient_only_steps": ambient}, {}),
        "texture": (TextureConfig, {"prompt": "a blue sphere", "seed": 1, "steps": args.texture_steps, "preview_views": 4,
                                    "evaluator": "none"}, {"uv": texture_input}),
    }
    results = {}
    for stage, (cls, row, inputs) in runs.items():
        if row["steps"] == 0:
            continue
        config = build_config(cls, preset.get(stage, {}), {**row, **overrides[stage]})
        results[stage] = measure(stage, config, root / stage, inputs, args.warmup)

    load = os.getloadavg()[0]
    print(f"torch threads {torch.get_num_threads()}, {os.cpu_count()} cores, load average {load:.2f} (1 min)")
    print(f"{'stage':<8} {'steps':>5} {'step ms':>8} " + " ".join(f"{p[:10]:>10}" for p in PARTS) + f" {'step/UNet':>10}")
    for stage, r in results.items():
        print(f"{stage:<8} {r['steps']:>5d} {r['step'] * 1e3:>8.1f} " + " ".join(f"{r[p] * 1e3:>10.1f}" for p in PARTS)
              + f" {r['step'] / max(r['UNet'], 1e-9):>9.2f}×")
    print("(ms per step; bar: step/UNet ≤ 1.6 for both stages)")


if __name__ == "__main__":
    main()
