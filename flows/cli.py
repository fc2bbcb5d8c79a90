"""The `csd-asset` command line."""

from __future__ import annotations

import argparse
import importlib.util
import logging
import sys
from importlib.metadata import PackageNotFoundError, version


def _version(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


def doctor(args: argparse.Namespace) -> int:
    """Report what this machine can run: packages, torch/CUDA, rasterizer backends, model caches."""
    import torch
    from huggingface_hub import constants

    from csd.models import TOY_PRIOR
    from csd.prompts import default_cache_dir

    rows = [("csd-asset", _version("csd-asset")), ("python", sys.version.split()[0])]
    rows += [(p, _version(p)) for p in ("torch", "diffusers", "transformers", "prefect", "mlflow", "trimesh", "pymeshlab", "xatlas")]
    cuda = torch.cuda.is_available()
    rows.append(("cuda", f"yes ({torch.cuda.device_count()} x {torch.cuda.get_device_name(0)})" if cuda else "no (CPU only)"))
    # find_spec only: nvdiffrast must never be imported on a machine without CUDA
    nvdiffrast = importlib.util.find_spec("nvdiffrast") is not None
    rows.append(("nvdiffrast", "installed" if nvdiffrast else "not installed (pip install 'csd-asset[gpu]' on CUDA machines)"))
    rows.append(("rasterizer 'auto'", "nvdiffrast" if cuda and nvdiffrast else "cpu"))
    rows.append(("toy prior", str(TOY_PRIOR) if (TOY_PRIOR / "model_index.json").exists() else f"MISSING at {TOY_PRIOR}"))
    rows.append(("hugging face cache", f"{constants.HF_HUB_CACHE} (offline: {constants.HF_HUB_OFFLINE})"))
    rows.append(("text embedding cache", str(default_cache_dir())))
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="csd-asset", description="CSV prompt catalogs to textured 3D assets with CSD.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version('csd-asset')}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("doctor", help="report torch/CUDA/nvdiffrast availability and model caches").set_defaults(func=doctor)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
