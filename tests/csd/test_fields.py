"""The implicit field's density activations and its save/load round trip."""

import dataclasses

import pytest
import torch

from csd.fields import FieldConfig, ImplicitVolume, load_field, save_field

TINY = FieldConfig(n_levels=2, log2_hashmap_size=8, base_resolution=4, max_resolution=16, hidden_dim=8)


def test_exp_activation_is_the_exponential_softplus_takes_the_log1p_of(tmp_path):
    torch.manual_seed(0)
    exp = ImplicitVolume(dataclasses.replace(TINY, density_activation="exp"))
    softplus = ImplicitVolume(TINY)
    softplus.load_state_dict(exp.state_dict())
    points = torch.rand(256, 3) * 1.4 - 0.7
    with torch.no_grad():
        e, s = exp.density(points), softplus.density(points)
        # softplus(x) = log(1 + eˣ): the same raw output through both activations
        torch.testing.assert_close(s, torch.log1p(e), atol=1e-5, rtol=1e-5)
        assert (e > 0).all() and e.max() > 1.0, "the blob bias makes the centre dense"
        exp.mlp[-1].bias[0] = 100.0
        assert torch.allclose(exp.density(points), torch.tensor(15.0).exp()), "raw values clamp at 15 before exp"
    save_field(exp, tmp_path)
    loaded = load_field(tmp_path)
    assert loaded.config.density_activation == "exp"
    torch.testing.assert_close(loaded.density(points), exp.density(points).detach())


def test_hashed_levels_read_densely_without_gradients_give_the_hashed_features():
    # level 1 (17³ vertices) is hashed into 2^10 rows and small enough (≤ 8×) to be read densely
    config = dataclasses.replace(TINY, log2_hashmap_size=10)
    torch.manual_seed(0)
    volume = ImplicitVolume(config)
    encoding = volume.encoding
    assert encoding.hashed_levels == [1] and hasattr(encoding, "vertex_hash_1")
    with torch.no_grad():
        for table in encoding.hashed:
            table.normal_()  # features that vary across the table, so a wrong vertex order shows
    points = torch.rand(512, 3, generator=torch.Generator().manual_seed(1)) * 2 - 1
    x = (points * 0.5 + 0.5).clamp(0, 1)
    hashed = encoding._corner_lookup(x, encoding.resolutions[1], encoding.hashed[0])
    with torch.no_grad():
        dense_read = encoding(x)[:, 2:]
        density = volume.density(points)
    torch.testing.assert_close(dense_read, hashed.detach(), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(density, volume.density(points).detach(), atol=1e-5, rtol=1e-6)


def test_analytic_normals_differentiate_twice_without_grid_sample(monkeypatch):
    # torch 2.11 on CUDA has no derivative of grid_sample's 3-D backward: with points that need
    # gradients (analytic normals, create_graph) dense levels are read by the 8-corner gather,
    # which must give grid_sample's features and a correct second derivative
    config = dataclasses.replace(TINY, normal_type="analytic")
    torch.manual_seed(0)
    volume = ImplicitVolume(config)
    encoding = volume.encoding
    assert encoding.dense_levels == [0]
    with torch.no_grad():
        for table in encoding.dense:
            table.normal_()  # features that vary across the grid, so a wrong vertex order shows
    x = torch.rand(256, 3, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = encoding(x)[:, :2]  # grid_sample
    gathered = encoding(x.clone().requires_grad_(True))[:, :2]
    torch.testing.assert_close(gathered, expected, atol=1e-6, rtol=1e-6)

    def no_grid_sample(*args, **kwargs):
        raise AssertionError("grid_sample read with points that need gradients")

    monkeypatch.setattr(torch.nn.functional, "grid_sample", no_grid_sample)
    points = (torch.rand(16, 3, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 1.2 - 0.6)
    points = torch.rand(16, 3, generator=torch.Generator().manual_seed(3)) * 1.2 - 0.6
    weights = torch.tensor([1.0, 2.0, 3.0])
    table = encoding.dense[0]

    def normal_loss() -> torch.Tensor:
        """A loss on analytic normals: its gradient runs through their create_graph backward."""
        return (volume.with_normals(points)[2] * weights).sum()

    (gradient,) = torch.autograd.grad(normal_loss(), table)
    direction = torch.randn(table.shape, generator=torch.Generator().manual_seed(4))
    eps, losses = 1e-2, []  # float32: the field casts its features to float
    for sign in (1, -1):
        with torch.no_grad():
            table.add_(sign * eps * direction)
            losses.append(float(normal_loss()))
            table.sub_(sign * eps * direction)
    assert float((gradient * direction).sum()) != 0.0
    assert float((gradient * direction).sum()) == pytest.approx((losses[0] - losses[1]) / (2 * eps), rel=1e-2)
