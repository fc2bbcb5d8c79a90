"""Same seeds, same outputs? Run every stage of one demo row with this tree's code on the upstream
outputs of a reference run and print how far each stage's outputs moved (asserts nothing).

    python bench/stage_parity.py --reference-only out/ref   # in a checkout of the old code (copy the script there)
    python bench/stage_parity.py out/ref out/new [--stages nerf,mesh,uv,texture,edit,export]   # in this tree

Short fixed-seed runs (nerf.steps=20, texture/edit.steps=10, mesh grid 64, evaluator off). Textures
are compared twice: over the texels a render reads (covered texel centres plus the one-texel ring of
a bilinear lookup) and over the seam-filled rest. CPU nerf training was not bit-reproducible run to
run here (two runs of the same code: field weights 3.9e-4 apart): compare `field_max_abs_diff` with
that of a second reference run.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

OVERRIDES = {
    "nerf.steps": 20, "texture.steps": 10, "edit.steps": 10, "mesh.extraction.resolution": 64,
    "texture.evaluator": "none", "edit.evaluator": "none",
}


def _texture_diff(reference: Path, new: Path) -> dict:
    import torch.nn.functional as F

    from csd.raster import rasterize_uv
    from stages.assets import read_textured_mesh

    a, b = read_textured_mesh(reference), read_textured_mesh(new)
    covered = rasterize_uv(a.uvs, a.faces, *a.texture.shape[:2]).mask.float()
    read = (F.max_pool2d(covered[None], 3, stride=1, padding=1)[0, 0] > 0).numpy()
    diff = np.abs(a.texture.astype(int) - b.texture.astype(int)).max(-1)
    return {
        "geometry_equal": bool(np.array_equal(a.vertices, b.vertices) and np.array_equal(a.uvs, b.uvs)),
        "read_texels": int(read.sum()), "read_differing": int((diff[read] > 0).sum()), "read_max_diff": int(diff[read].max()),
        "other_differing": int((diff[~read] > 0).sum()), "other_max_diff": int(diff[~read].max(initial=0)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("reference", type=Path)
    parser.add_argument("new", type=Path, nargs="?")
    parser.add_argument("--reference-only", action="store_true", help="run the row into REFERENCE with this tree's code")
    parser.add_argument("--asset", default="red-cube")
    parser.add_argument("--stages", default="nerf,mesh,uv,texture,edit,export")
    args = parser.parse_args()

    from flows.pipeline import execute_stage, load_catalog

    _, plans = load_catalog(Path("catalogs/demo.csv"), overrides=OVERRIDES, out=args.reference)
    plan = next(p for p in plans if p.row.asset_id == args.asset)
    for stage in plan.stages:
        if args.reference_only:
            execute_stage(stage)
            continue
        if stage.name not in args.stages.split(","):
            continue
        started = time.perf_counter()
        result = stage.spec.load().run(stage.config, args.new / stage.name, inputs=stage.inputs, identity="parity")
        ref, new = Path(stage.directory), args.new / stage.name
        reference_metrics = json.loads((ref / "result.json").read_text())["metrics"]
        out: dict = {"seconds": round(time.perf_counter() - started, 1)}
        out["metrics_changed"] = {k: [reference_metrics.get(k), v] for k, v in result.metrics.items() if reference_metrics.get(k) != v}
        if (ref / "field.safetensors").exists():
            from safetensors.numpy import load_file

            a, b = load_file(ref / "field.safetensors"), load_file(new / "field.safetensors")
            out["field_max_abs_diff"] = float(max(np.abs(a[k] - b[k]).max() for k in a))
        if (ref / "mesh.ply").exists():
            import trimesh

            a, b = trimesh.load(ref / "mesh.ply", process=False), trimesh.load(new / "mesh.ply", process=False)
            out["same_faces"] = bool(np.array_equal(a.faces, b.faces))
            out["vertex_max_diff"] = float(np.abs(a.vertices - b.vertices).max()) if out["same_faces"] else None
        if (ref / "texture.png").exists():
            out["texture"] = _texture_diff(ref, new)
        if (ref / "history.json").exists():
            a, b = (json.loads((d / "history.json").read_text()) for d in (ref, new))
            keys = sorted(set(a[0]) - {"step_time"}) if a else []
            out["history_max_diff"] = max((abs(x[k] - y[k]) for x, y in zip(a, b) for k in keys), default=0.0)
        print(stage.name, json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
