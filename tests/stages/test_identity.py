"""Stage identity: the source files a stage runs and the weights of the prior, fingerprinted without loading."""

import json
import shutil
from pathlib import Path

import pytest

from csd.models import ModelConfig, ModelNotFoundError
from stages import identity
from stages.identity import PROJECT_ROOT, file_digest, model_fingerprint, source_files, source_fingerprint, weights_fingerprints
from stages.nerf import NerfConfig


def copy_sources(root: Path) -> Path:
    """The `csd` and `stages` Python files, copied under `root` (no weights, no caches)."""
    for package in identity.CODE_PACKAGES:
        for file in (PROJECT_ROOT / package).rglob("*.py"):
            target = root / file.relative_to(PROJECT_ROOT)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(file, target)
    return root


def fake_model(path: Path) -> Path:
    """A diffusers-layout folder as far as planning reads it: an index and component files (never loaded)."""
    (path / "unet").mkdir(parents=True)
    (path / "tokenizer").mkdir()
    (path / "model_index.json").write_text(json.dumps({"_class_name": "X", "unet": ["diffusers", "UNet2DConditionModel"],
                                                       "tokenizer": ["transformers", "CLIPTokenizer"]}))
    (path / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(bytes(range(256)) * 4)
    (path / "tokenizer" / "vocab.json").write_text("{}")
    (path / "README.md").write_text("not read by load_prior")
    return path


def _relative(files):
    return {f.relative_to(PROJECT_ROOT).as_posix() for f in files}


def test_source_files_follow_imports_transitively_and_inside_functions():
    texture = _relative(source_files("stages.texture"))
    assert {"stages/texture.py", "stages/__init__.py", "stages/common.py", "csd/__init__.py", "csd/guidance.py",
            "csd/raster/__init__.py"} <= texture, "the module, its packages and what it imports"
    assert "csd/toy/evaluator.py" in texture, "imported inside a function of stages/texture.py"
    assert "csd/toy/world.py" in texture, "imported by csd/toy/evaluator.py (transitively)"
    assert "stages/texture.py" in _relative(source_files("stages.edit")), "edit imports the texture stage"
    mesh = _relative(source_files("stages.mesh"))
    assert "csd/guidance.py" not in mesh and "stages/nerf.py" not in mesh, "only what the stage imports"
    assert all(name.split("/")[0] in ("csd", "stages") for name in texture), "third-party modules are not project code"


def test_a_changed_source_file_changes_the_fingerprint_of_the_stages_that_import_it(tmp_path):
    root = copy_sources(tmp_path)
    before = {m: source_fingerprint(m, root) for m in ("stages.nerf", "stages.mesh", "stages.uv")}
    assert before == {m: source_fingerprint(m, root) for m in before}, "an unchanged tree keeps its fingerprints"
    assert before == {m: source_fingerprint(m) for m in before}, "the fingerprint depends on content, not on where the tree is"

    with (root / "csd" / "raster" / "__init__.py").open("a") as handle:
        handle.write("\n# a change to the mesh renderer\n")
    after = {m: source_fingerprint(m, root) for m in before}
    assert [m for m in before if after[m] != before[m]] == ["stages.mesh", "stages.uv"], "uv and mesh render with csd.raster; nerf does not"

    with (root / "stages" / "nerf.py").open("a") as handle:
        handle.write("\n# a change to the nerf stage\n")
    assert [m for m in after if source_fingerprint(m, root) != after[m]] == ["stages.nerf"]


def test_model_fingerprint_hashes_the_loaded_files_without_loading(tmp_path):
    model = fake_model(tmp_path / "model")
    config = ModelConfig(model=str(model))
    before = model_fingerprint(config)
    assert before.startswith("sha256:") and model_fingerprint(config) == before

    (model / "README.md").write_text("edited notes")
    assert model_fingerprint(config) == before, "files load_prior does not read are not weights"

    weights = model / "unet" / "diffusion_pytorch_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[100] ^= 0xFF  # same size: a fingerprint of sizes alone would miss it
    weights.write_bytes(bytes(data))
    assert model_fingerprint(config) != before

    assert model_fingerprint(ModelConfig(model="toy")).startswith("sha256:"), "the shipped prior is a local folder"


def test_file_digests_are_cached_by_path_size_and_mtime(tmp_path, monkeypatch):
    monkeypatch.setenv("CSD_ASSET_CACHE", str(tmp_path / "cache"))
    big = tmp_path / "weights.bin"
    big.write_bytes(b"\1" * (1 << 24))
    digest = file_digest(big)
    saved = json.loads((tmp_path / "cache" / "file-digests.json").read_text())
    assert digest in saved.values(), "a big file's digest is kept across processes"
    big.write_bytes(b"\2" * (1 << 24))
    assert file_digest(big) != digest, "a rewritten file (new mtime) is hashed again"


def _hub_snapshot(cache: Path, repo: str, commit: str) -> None:
    folder = cache / f"models--{repo.replace('/', '--')}"
    (folder / "snapshots" / commit).mkdir(parents=True)
    (folder / "snapshots" / commit / "model_index.json").write_text("{}")
    (folder / "refs").mkdir(exist_ok=True)
    (folder / "refs" / "main").write_text(commit)


def test_a_hub_model_is_named_by_its_cached_snapshot_commit(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    config = ModelConfig(model="owner/model")
    assert model_fingerprint(config) == "hub:owner/model@main:not-cached"
    _hub_snapshot(tmp_path / "hub", "owner/model", "a" * 40)
    assert model_fingerprint(config) == f"hub:{'a' * 40}"
    _hub_snapshot(tmp_path / "hub", "owner/model", "b" * 40)  # a new snapshot becomes main
    assert model_fingerprint(config) == f"hub:{'b' * 40}"


def test_weights_fingerprints_find_every_model_config(tmp_path):
    model = fake_model(tmp_path / "model")
    found = weights_fingerprints(NerfConfig(prompt="a red cube", model=ModelConfig(model=str(model))))
    assert found == {"model": model_fingerprint(ModelConfig(model=str(model)))}
    with pytest.raises(ModelNotFoundError, match="model_index.json"):
        weights_fingerprints(NerfConfig(prompt="a red cube", model=ModelConfig(model=str(tmp_path))))


def test_a_parse_spoiled_by_another_threads_ast_is_parsed_again(monkeypatch, tmp_path):
    # CPython 3.11 gh-106905: a concurrent AST build elsewhere makes a sound parse raise SystemError once
    import ast

    from stages import identity

    real, calls = ast.parse, []

    def flaky(*args, **kwargs):
        calls.append(args)
        if len(calls) == 1:
            raise SystemError("AST constructor recursion depth mismatch (before=48, after=47)")
        return real(*args, **kwargs)

    source = tmp_path / "m.py"
    source.write_text("import csd.models\nfrom stages import common\n")
    monkeypatch.setattr(identity.ast, "parse", flaky)
    assert identity._parse_imports(source, "m") >= {"csd.models", "stages", "stages.common"}
    assert len(calls) == 2
