"""Sample pruning in the volume renderer (nerfacc's alpha threshold and early stop): the image is
the same, the full query sees a fraction of the samples."""

import torch

from csd.cameras import CameraConfig, sample_cameras
from csd.renderer import RendererConfig, VolumeRenderer


class Ball:
    """An opaque ball of radius 0.5 (σ = 40) in a faint haze (σ = 0.01), red albedo; counts full queries."""

    bound = 1.0

    def __init__(self):
        self.queried = 0

    def density(self, points):
        inside = points.norm(dim=-1) < 0.5
        return torch.where(inside, torch.tensor(40.0), torch.tensor(0.01))

    def __call__(self, points):
        self.queried += points.shape[0]
        return self.density(points), torch.tensor([0.9, 0.1, 0.1]).expand(points.shape[0], 3)


def render(config: RendererConfig):
    ball = Ball()
    renderer = VolumeRenderer(config, bound=1.0)
    renderer.update_occupancy(ball, 0, torch.Generator().manual_seed(0))
    cameras = sample_cameras(2, CameraConfig(), torch.Generator().manual_seed(1))
    out = renderer.render(ball, cameras, 24, training=False)
    return out, ball.queried


def test_pruning_keeps_the_image_and_skips_invisible_samples():
    base = dict(num_samples=48, occupancy_resolution=16, occupancy_threshold=0.001)
    full, queried_full = render(RendererConfig(**base, alpha_threshold=0.0, early_stop_eps=0.0))
    pruned, queried_pruned = render(RendererConfig(**base))
    # the haze (alpha ≈ 0.01 × 0.042 ≈ 4e-4 < 0.01, yet occupied in the grid) and everything behind the ball's front are skipped ...
    assert queried_pruned < 0.35 * queried_full
    # ... and what they contributed is below the thresholds' worth
    assert (pruned.rgb - full.rgb).abs().max() < 0.03
    assert (pruned.opacity - full.opacity).abs().max() < 0.03
    # the ball itself is kept: its centre pixels are opaque red in both
    assert pruned.opacity.amax() > 0.99


def test_threshold_is_capped_by_the_grid_mean_before_any_update():
    renderer = VolumeRenderer(RendererConfig(occupancy_resolution=8), bound=1.0)
    assert renderer.grid.mean_optical_depth == 0.0  # nothing learned yet: only early stop prunes
