"""Flow tests: a private Prefect home and test server, and toy-cpu overrides that make a stage take seconds."""

from __future__ import annotations

import os
import tempfile

import pytest

os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="prefect-home-"))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

_TINY = {
    "nerf.resolution": 16, "nerf.batch_size": 1, "nerf.preview_views": 4, "nerf.preview_resolution": 16, "nerf.renderer.num_samples": 16,
    "mesh.extraction.resolution": 32, "mesh.extraction.coarse_resolution": 16, "mesh.extraction.threshold": "auto",
    "mesh.cleanup.remesh_iterations": 0, "mesh.cleanup.target_faces": 500, "mesh.preview_views": 2, "mesh.preview_resolution": 16,
    "uv.unwrap.resolution": 64, "uv.preview_views": 2, "uv.preview_resolution": 16,
    "texture.steps": 2, "texture.batch_size": 1, "texture.resolution": 16, "texture.preview_views": 2,
    "texture.preview_resolution": 16, "texture.evaluator": "none",
    "edit.steps": 2, "edit.batch_size": 1, "edit.resolution": 16, "edit.preview_views": 2, "edit.preview_resolution": 16,
    "edit.evaluator": "none",
    "export.scorer": "none", "export.turntable_frames": 16, "export.render_resolution": 16, "export.score_views": 2,
    "export.video": "gif",
}


@pytest.fixture(scope="session")
def tiny() -> dict:
    """Overrides of toy-cpu that cut every stage to seconds (catalogs set `nerf.steps`); scorers off."""
    return dict(_TINY)


@pytest.fixture(scope="session")
def prefect_server():
    """A temporary Prefect server and database for the whole session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield
