"""Unit tests of the CKA analysis: linear_cka's properties, conv_activations' hooks, cka_matrix."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from custom_networks import HyperUNet, PlainUNet
from custom_networks.research.analysis import cka_matrix, conv_activations, linear_cka

TOL = 1e-6


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# --------------------------------------------------------------------------- linear_cka


@pytest.mark.parametrize("n, p", [(200, 10), (20, 300)])  # feature form and Gram form
def test_cka_identity_scaling_and_orthogonal_invariance(n, p):
    x = randn(n, p)
    q, _ = torch.linalg.qr(randn(p, p, seed=1))
    assert abs(linear_cka(x, x) - 1.0) < TOL
    assert abs(linear_cka(x, 3.7 * x) - 1.0) < TOL
    assert abs(linear_cka(x, x @ q) - 1.0) < TOL
    y = randn(n, 7, seed=2) + x[:, :7]
    ref = linear_cka(x, y)
    assert 0.05 < ref < 0.95
    assert abs(linear_cka(3.7 * x, y) - ref) < TOL
    assert abs(linear_cka(x @ q, y) - ref) < TOL
    assert abs(linear_cka(y, x) - ref) < TOL  # symmetric
    assert abs(linear_cka(x + 5.0, y - 2.0) - ref) < TOL  # columns are centred


def test_cka_gram_and_feature_forms_agree_and_accept_numpy():
    x, y = randn(30, 25), randn(30, 20, seed=1) + randn(30, 20, seed=1) @ randn(20, 20, seed=2)
    x_small = x[:, :5]
    # n=30 > p1 + p2 = 25 -> feature form; n=30 < 45 -> Gram form: check both against the formula
    for a, b in [(x_small, y[:, :5]), (x, y)]:
        a_c, b_c = a - a.mean(0), b - b.mean(0)
        expected = (torch.linalg.norm(b_c.T @ a_c) ** 2 / (torch.linalg.norm(a_c.T @ a_c) * torch.linalg.norm(b_c.T @ b_c))).item()
        assert abs(linear_cka(a, b) - expected) < 1e-12
        assert abs(linear_cka(a.float().numpy(), b.float().numpy()) - expected) < 1e-5


def test_cka_independent_near_zero_correlated_high():
    x, y = randn(2000, 10, seed=3), randn(2000, 10, seed=4)
    assert linear_cka(x, y) < 0.05
    # a well-conditioned mixing: linear CKA is invariant to orthogonal maps and isotropic scaling
    # only, so a generic Gaussian A (singular values spread over orders of magnitude) gives a
    # lower score (about 0.72 for seed 5), correctly so
    q1, _ = torch.linalg.qr(randn(10, 10, seed=5))
    q2, _ = torch.linalg.qr(randn(10, 10, seed=7))
    a = q1 @ torch.diag(torch.linspace(0.7, 1.3, 10, dtype=torch.float64)) @ q2
    y = x @ a + 0.1 * randn(2000, 10, seed=6)
    assert linear_cka(x, y) > 0.9
    assert linear_cka(y, randn(2000, 10, seed=8)) < 0.05


def test_cka_errors():
    with pytest.raises(ValueError, match=r"\(10, 3\).*\(9, 3\)"):
        linear_cka(randn(10, 3), randn(9, 3))
    with pytest.raises(ValueError, match="n >= 2"):
        linear_cka(randn(1, 3), randn(1, 4))
    with pytest.raises(ValueError, match="2D"):
        linear_cka(randn(10), randn(10, 2))
    assert np.isnan(linear_cka(torch.ones(5, 2), randn(5, 2)))  # constant features: undefined


# --------------------------------------------------------------------------- conv_activations


def test_conv_activations_order_shapes_and_no_hooks_left():
    torch.manual_seed(0)
    net = PlainUNet(spatial_dims=3, in_channels=1, out_channels=2, channels=(4, 8), convs_per_level=1).eval()
    x = torch.randn(2, 1, 8, 8, 6)
    acts = conv_activations(net, x)
    expected = {
        "down.0.0": (2, 4, 8, 8, 6),
        "down.0.1": (2, 4, 8, 8, 6),
        "down.1.0": (2, 8, 4, 4, 3),
        "down.1.1": (2, 8, 4, 4, 3),
        "up.0.convs.0": (2, 4, 8, 8, 6),
        "head": (2, 2, 8, 8, 6),
    }
    assert list(acts) == list(expected)  # forward order
    assert {k: tuple(v.shape) for k, v in acts.items()} == expected
    with torch.no_grad():
        assert torch.allclose(acts["head"], net(x))
        assert torch.allclose(acts["down.0.1"], net.down[0](x))  # block output, i.e. after the norm
    # InstanceNorm(affine) output: per-channel mean = bias of the norm
    bias = net.down[0][1][2].bias
    assert torch.allclose(acts["down.0.1"].mean(dim=(2, 3, 4)), bias.expand(2, -1), atol=1e-5)
    assert all(len(m._forward_hooks) == 0 for m in net.modules())

    with pytest.raises(RuntimeError):  # wrong channel count: hooks are removed on error too
        conv_activations(net, torch.randn(1, 3, 8, 8, 6))
    assert all(len(m._forward_hooks) == 0 for m in net.modules())
    with pytest.raises(TypeError):
        conv_activations(torch.nn.Conv3d(1, 1, 3), x)


# --------------------------------------------------------------------------- cka_matrix


@pytest.fixture(scope="module")
def generated_acts():
    torch.manual_seed(0)
    net = HyperUNet(spatial_dims=3, in_channels=1, out_channels=2, channels=(4, 8), convs_per_level=1)
    x = torch.randn(2, 1, 8, 8, 8, generator=torch.Generator().manual_seed(1))
    return conv_activations(net.generate(1.0), x), conv_activations(net.generate(2.5), x)


def test_cka_matrix_self_diagonal_one_and_symmetric(generated_acts):
    acts, _ = generated_acts
    names_a, names_b, m = cka_matrix(acts, acts)
    assert names_a == names_b == list(acts)
    assert m.shape == (6, 6) and m.dtype == np.float64
    assert np.allclose(np.diag(m), 1.0, atol=TOL)
    assert np.allclose(m, m.T, atol=1e-12)
    assert np.all((m > -TOL) & (m < 1 + TOL))
    # the same computation through two distinct (equal) dicts
    _, _, m2 = cka_matrix(acts, dict(acts))
    assert np.allclose(m, m2, atol=1e-10)
    assert np.allclose(m2, m2.T, atol=1e-10)


def test_cka_matrix_resamples_to_the_coarser_grid(generated_acts):
    acts, other = generated_acts
    fine = acts["down.0.1"]  # (2, 4, 8, 8, 8)
    coarse = F.interpolate(fine, size=(4, 4, 4), mode="trilinear", align_corners=False)
    _, _, m = cka_matrix({"fine": fine}, {"coarse": coarse, "fine": fine})
    assert abs(m[0, 0] - 1.0) < TOL and abs(m[0, 1] - 1.0) < TOL
    # an entry across resolutions equals linear_cka on the fine layer reduced to the coarse grid
    a, b = acts["down.0.1"], other["down.1.1"]
    _, _, m = cka_matrix({"a": a}, {"b": b})
    a4 = F.interpolate(a.double(), size=(4, 4, 4), mode="trilinear", align_corners=False)
    expected = linear_cka(a4.movedim(1, -1).reshape(-1, 4), b.double().movedim(1, -1).reshape(-1, 8))
    assert abs(m[0, 0] - expected) < 1e-10
    # a factor-2 trilinear reduction with align_corners=False is the 2x2x2 average
    assert torch.allclose(a4, F.avg_pool3d(a.double(), 2))


def test_cka_matrix_position_subsampling_is_seeded(generated_acts):
    acts, other = generated_acts
    _, _, full = cka_matrix(acts, other)
    _, _, s1 = cka_matrix(acts, other, positions=100, seed=3)
    _, _, s2 = cka_matrix(acts, other, positions=100, seed=3)
    _, _, s3 = cka_matrix(acts, other, positions=100, seed=4)
    assert np.array_equal(s1, s2)
    assert not np.allclose(s1, s3)
    assert np.abs(s1 - full).max() < 0.3  # a subsample estimates the same quantity
    _, _, s_all = cka_matrix(acts, other, positions=10**9)
    assert np.allclose(s_all, full, atol=1e-12)
    _, _, s_self = cka_matrix(acts, acts, positions=100)
    assert np.allclose(np.diag(s_self), 1.0, atol=TOL)


def test_cka_matrix_errors(generated_acts):
    acts, _ = generated_acts
    with pytest.raises(ValueError, match="same B"):
        cka_matrix(acts, {"x": acts["head"][:1]})
    with pytest.raises(ValueError):
        cka_matrix(acts, {})
    with pytest.raises(ValueError):
        cka_matrix(acts, acts, positions=1)
    with pytest.raises(ValueError):
        cka_matrix(acts, acts, resample="nearest")
