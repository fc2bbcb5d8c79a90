"""Accuracy of the toy evaluator on fresh renders: `python tools/toy/evaluator_accuracy.py [--n 1024]`.

Draws `--n` primitives and `--n` non-primitives from `--seed` (by default `REPORT_SEED`, which no
training reads; the training's own validation uses `VALIDATION_SEED`) and prints, as JSON, the
colour and shape accuracy on primitives over the world's light backgrounds (`plain`) and tinted
ones, the share of non-primitives called `other` (the views `OTHER_MAX_IOU` keeps), and on another
`--n` non-primitives over the world's backgrounds, per kind, the share of views kept and called
`other` (kept views, and for comparison every view), and what the evaluator calls the vase-like red
cube with a horn of the demo (8 orbit views). With `--grids DIR` it writes the sets as PNG grids
(and the mistakes) there. Never reads pipeline outputs.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from csd.toy.evaluator import EVALUATOR_WEIGHTS, OTHER_MAX_IOU, OTHER_SEED_OFFSET, REPORT_SEED, accuracy, held_out_images, load_evaluator, render_objects
from csd.toy.world import OTHER_KINDS, WorldConfig, primitive_silhouette_iou, sample_other_scenes


def other_kinds(evaluator, n: int, seed: int) -> dict[str, dict[str, float]]:
    """Per kind of non-primitive: the share of its views kept (not primitive-like) and of those called `other`."""
    from csd.cameras import sample_cameras
    from csd.toy.world import render_layers

    config = WorldConfig()
    generator = torch.Generator().manual_seed(seed + OTHER_SEED_OFFSET + 7919)
    scenes = sample_other_scenes(n, config, generator)
    cameras = sample_cameras(n, config.cameras, generator)
    colour, alpha = render_layers(scenes, cameras, config)
    kept = primitive_silhouette_iou(scenes, cameras, config, alpha) <= OTHER_MAX_IOU
    images = (colour + (1 - alpha) * scenes.background[:, :, None, None]).clamp(0, 1)
    called = torch.cat([evaluator(evaluator.prepare(images[i : i + 500])).shape_logits.argmax(1) for i in range(0, n, 500)])
    other = called == evaluator.config.shapes.index("other")
    by_kind = {
        name: {
            "views": int((scenes.kind == k).sum()),
            "kept": round(float(kept[scenes.kind == k].float().mean()), 3),
            "other (kept views)": round(float(other[(scenes.kind == k) & kept].float().mean()), 3),
            "other (all views)": round(float(other[scenes.kind == k].float().mean()), 3),
        }
        for k, name in enumerate(OTHER_KINDS)
    }
    by_kind["all kinds"] = {
        "views": n, "kept": round(float(kept.float().mean()), 3),
        "other (kept views)": round(float(other[kept].float().mean()), 3), "other (all views)": round(float(other.float().mean()), 3),
    }
    return by_kind


def vase(evaluator) -> list[str]:
    """What the evaluator sees in 8 orbit views of the demo's red cube: stretched upright ×1.7, a horn out of its side."""
    from csd.cameras import orbit_cameras
    from csd.toy.world import render, vase_with_horn

    scenes, config = vase_with_horn(8)
    return evaluator.score(render(scenes, orbit_cameras(8), config), "a red cube").predicted_shapes


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="tools/toy/evaluator_accuracy.py", description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1024, help="renders per set")
    parser.add_argument("--seed", type=int, default=REPORT_SEED)
    parser.add_argument("--weights", type=Path, default=EVALUATOR_WEIGHTS)
    parser.add_argument("--grids", type=Path, default=None, help="write PNG grids of the sets here")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    evaluator = load_evaluator(args.weights)
    numbers: dict = {"weights": str(args.weights), "seed": args.seed, "renders": args.n}
    sets = {
        "primitives": held_out_images(args.n, args.seed),
        "other": held_out_images(args.n, args.seed, other=True),
    }
    for name, held in sets.items():
        for background in ("plain", "tinted"):
            images = getattr(held, background)
            score = accuracy(evaluator, images, held.colour_label, held.shape_label)
            numbers[f"{name} {background}"] = {"colour": round(score.colour, 4), "shape": round(score.shape, 4)}
            if args.grids is not None:
                from tools.toy.train import write_grid

                args.grids.mkdir(parents=True, exist_ok=True)
                slug = name.replace(", ", "-").replace(" ", "-")
                write_grid(images[:128], 16, args.grids / f"{slug}-{background}.png")
                with torch.no_grad():
                    called = evaluator(evaluator.prepare(images)).shape_logits.argmax(1)
                wrong = (called != held.shape_label).nonzero().flatten()[:64]
                if len(wrong):
                    write_grid(images[wrong], 16, args.grids / f"{slug}-{background}-mistakes.png")
                    numbers[f"{name} {background}"]["mistakes called"] = dict(
                        sorted({s: int((called[wrong] == i).sum()) for i, s in enumerate(evaluator.config.shapes)}.items())
                    )
    if args.grids is not None:  # the training set's `other` class, as rendered (first 128 of its pool)
        from csd.toy.evaluator import TRAIN_SEED
        from tools.toy.train import write_grid

        layers = render_objects(128, TRAIN_SEED + OTHER_SEED_OFFSET, other=True)
        write_grid((layers.colour + (1 - layers.alpha) * layers.background[:, :, None, None]).clamp(0, 1), 16, args.grids / "train-other.png")
    numbers["other by kind (plain)"] = other_kinds(evaluator, args.n, args.seed)
    numbers["vase-like red cube, 8 views"] = vase(evaluator)
    print(json.dumps(numbers, indent=2))


if __name__ == "__main__":
    main()
