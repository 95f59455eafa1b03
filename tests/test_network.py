"""Unit tests of the networks: PlainUNet, HyperUNet (generation, batching, gradients, cache,
spacing validation) and UNetLayout."""

import warnings

import pytest
import torch

from custom_networks import HyperUNet, PlainUNet, UNetLayout

SMALL = dict(in_channels=1, out_channels=2, channels=(4, 8, 16), convs_per_level=1)
ATOL = 1e-5


def small_hyper(spatial_dims=3, seed=0):
    torch.manual_seed(seed)
    return HyperUNet(spatial_dims=spatial_dims, **SMALL)


def n_params(module):
    return sum(p.numel() for p in module.parameters())


# --------------------------------------------------------------------------- generate / TorchScript


@pytest.mark.parametrize(
    "spatial_dims, spacing, shape",
    [(3, (1.0, 1.0, 2.5), (2, 1, 16, 16, 8)), (2, (0.6, 1.8), (2, 1, 16, 24))],
)
def test_generate_matches_forward_and_torchscript(spatial_dims, spacing, shape):
    net = small_hyper(spatial_dims).eval()
    torch.manual_seed(1)
    x = torch.randn(shape)
    unet = net.generate(spacing)
    assert isinstance(unet, PlainUNet) and not unet.training
    assert n_params(unet) == sum(h.out_features for h in net.heads)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TorchScript deprecation warning of this torch version
        scripted = torch.jit.script(unet)
    with torch.no_grad():
        expected = net(x, torch.tensor(spacing))
        direct = unet(x)
        script_out = scripted(x)
        # a different spacing gives a different network: the comparison above can fail
        other = net(x, torch.tensor(spacing) * 2)
    assert expected.shape == (shape[0], 2, *shape[2:])
    torch.testing.assert_close(direct, expected, atol=ATOL, rtol=0)
    torch.testing.assert_close(script_out, expected, atol=ATOL, rtol=0)
    assert (other - expected).abs().max() > 1e-3
    # the string and number forms of the spacing give the same network
    unet_str = net.generate(",".join(str(s) for s in spacing))
    with torch.no_grad():
        torch.testing.assert_close(unet_str(x), expected, atol=ATOL, rtol=0)
    iso = net.generate(1.5)
    with torch.no_grad():
        torch.testing.assert_close(iso(x), net(x, torch.full((spatial_dims,), 1.5)), atol=ATOL, rtol=0)


@pytest.mark.parametrize("spatial_dims", [3, 2])
def test_mixed_spacing_batch_equals_one_by_one(spatial_dims):
    net = small_hyper(spatial_dims)
    torch.manual_seed(2)
    x = torch.randn(3, 1, *([12] * spatial_dims))
    a = [1.0] * spatial_dims
    b = [2.0] * (spatial_dims - 1) + [0.7]
    spacing = torch.tensor([a, b, a])
    with torch.no_grad():
        batched = net(x, spacing)
        single = torch.cat([net(x[i : i + 1], spacing[i : i + 1]) for i in range(3)])
        # samples 0 and 2 share a spacing; swapping spacings changes the result
        swapped = net(x, torch.tensor([b, a, b]))
    assert batched.shape == (3, 2, *x.shape[2:])
    torch.testing.assert_close(batched, single, atol=ATOL, rtol=0)
    assert (swapped - batched).abs().amax(dim=tuple(range(1, batched.dim()))).min() > 1e-4


# --------------------------------------------------------------------------- gradients


def test_gradients_reach_only_the_hypernetwork():
    net = small_hyper().train()
    names = [n for n, _ in net.named_parameters()]
    assert names and all(n.startswith(("embed.", "heads.")) for n in names), names
    assert any(n.startswith("embed.") for n in names) and any(n.startswith("heads.") for n in names)
    template = net.primary
    assert all(p.is_meta for p in template.parameters())
    assert all(p.device.type == "meta" for p in template.parameters())
    # the template's parameters are not registered with the hypernetwork
    param_ids = {id(p) for p in net.parameters()}
    assert not any(id(p) in param_ids for p in template.parameters())
    assert n_params(net) == sum(p.numel() for n, p in net.named_parameters() if n.startswith(("embed.", "heads.")))

    torch.manual_seed(3)
    x = torch.randn(3, 1, 12, 12, 12)
    target = torch.randint(0, 2, (3, 12, 12, 12))
    y = net(x, torch.tensor([[1.0, 1.0, 1.0], [2.0, 2.0, 3.0], [1.0, 1.0, 1.0]]))
    loss = torch.nn.functional.cross_entropy(y, target)
    loss.backward()
    for name, p in net.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
    for i, head in enumerate(net.heads):
        total = head.weight.grad.abs().sum() + head.bias.grad.abs().sum()
        assert total > 0, f"head {i} got no gradient"
    assert sum(float(p.grad.abs().sum()) for p in net.embed.parameters()) > 0


# --------------------------------------------------------------------------- eval-mode cache


def test_eval_cache_invalidation_and_training_mode():
    net = small_hyper(seed=4)
    torch.manual_seed(5)
    x = torch.randn(1, 1, 12, 12, 12)
    s1, s2 = torch.tensor([1.0, 1.0, 2.0]), torch.tensor([2.0, 2.0, 2.0])

    net.eval()
    with torch.no_grad():
        y1 = net(x, s1)
        count = net.generation_count
        y1b = net(x, s1)
        assert net.generation_count == count  # cached
        torch.testing.assert_close(y1b, y1, atol=0, rtol=0)
        net(x, s2)
        assert net.generation_count == count + 1  # a new spacing generates
        net(x, s1)
        net(x, s2)
        assert net.generation_count == count + 1  # both are cached now

    # an optimiser step invalidates the cache and changes the output
    net.train()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.5)
    optimizer.zero_grad()
    net(x, s1).square().mean().backward()
    optimizer.step()
    net.eval()
    with torch.no_grad():
        count = net.generation_count
        y_step = net(x, s1)
        assert net.generation_count == count + 1
        assert (y_step - y1).abs().max() > 1e-4
        # the regenerated weights equal freshly generated ones
        torch.testing.assert_close(y_step, net.generate(s1)(x), atol=ATOL, rtol=0)

    # load_state_dict from another model: the output becomes that model's output
    other = small_hyper(seed=6).eval()
    with torch.no_grad():
        y_other = other(x, s1)
        assert (y_other - y_step).abs().max() > 1e-4
        net(x, s1)  # make sure the old weights are cached
        net.load_state_dict(other.state_dict())
        torch.testing.assert_close(net(x, s1), y_other, atol=ATOL, rtol=0)

    # train mode (even without grad) and grad mode (even in eval) never cache
    net.train()
    with torch.no_grad():
        count = net.generation_count
        net(x, s1)
        net(x, s1)
        assert net.generation_count == count + 2
    net.eval()
    count = net.generation_count
    net(x, s1)
    net(x, s1)
    assert net.generation_count == count + 2
    # a batch of two distinct spacings generates two weight sets
    count = net.generation_count
    net(torch.cat([x, x]), torch.stack([s1, s2]))
    assert net.generation_count == count + 2


# --------------------------------------------------------------------------- spacing validation


BAD_SPACINGS = [
    pytest.param(None, r"spacing is missing.*\(2, 3\)", id="missing"),
    pytest.param(torch.ones(2, 2), r"shape \(2, 2\).*\(2, 3\)", id="2x2-for-3d"),
    pytest.param(torch.ones(3, 3), r"shape \(3, 3\).*\(2, 3\)", id="3x3-for-batch-2"),
    pytest.param(torch.tensor([0.0, 1.0, 1.0]), r"\[\[0\.0, 1\.0, 1\.0\]\].*\(2, 3\)", id="zero"),
    pytest.param(torch.tensor([[1.0, 1.0, 1.0], [1.0, -2.0, 1.0]]), r"-2\.0.*\(2, 3\)", id="negative"),
    pytest.param(torch.tensor([float("nan"), 1.0, 1.0]), r"nan.*\(2, 3\)", id="nan"),
    pytest.param(torch.tensor([1.0, float("inf"), 1.0]), r"inf.*\(2, 3\)", id="inf"),
    pytest.param("abc", r"'abc'.*not numeric.*\(2, 3\)", id="string"),
]


@pytest.mark.parametrize("spacing, match", BAD_SPACINGS)
def test_bad_spacing_raises(spacing, match):
    net = small_hyper()
    x = torch.zeros(2, 1, 8, 8, 8)
    with pytest.raises(ValueError, match=match):
        net(x, spacing)


def test_wrong_input_dims_raises():
    net = small_hyper()
    with pytest.raises(ValueError, match=r"\(1, 1, 8, 8\).*3D"):
        net(torch.zeros(1, 1, 8, 8), torch.ones(1, 3))
    net2d = small_hyper(spatial_dims=2)
    with pytest.raises(ValueError, match=r"2D"):
        net2d(torch.zeros(1, 1, 8, 8, 8), torch.ones(1, 2))
    with pytest.raises(ValueError, match=r"\(1, 2\)"):
        net2d(torch.zeros(1, 1, 8, 8), torch.ones(1, 3))


# --------------------------------------------------------------------------- PlainUNet and layout


@pytest.mark.parametrize("spatial", [(17, 23, 9), (5, 6, 7), (19, 13)])
def test_plain_unet_odd_sizes(spatial):
    torch.manual_seed(0)
    net = PlainUNet(spatial_dims=len(spatial), **SMALL)
    x = torch.randn(2, 1, *spatial)
    with torch.no_grad():
        y = net(x)
        y_spacing = net(x, torch.ones(2, len(spatial)))  # the spacing is accepted and ignored
    assert y.shape == (2, 2, *spatial)
    torch.testing.assert_close(y, y_spacing)
    assert torch.isfinite(y).all()


def test_hyper_unet_odd_sizes():
    net = small_hyper()
    with torch.no_grad():
        y = net(torch.randn(1, 1, 17, 23, 9), (1.0, 1.0, 3.0))
    assert y.shape == (1, 2, 17, 23, 9)


def test_paper_layout_parameter_counts():
    plain = PlainUNet()
    assert plain.layout.channels == (16, 32, 64, 128)
    assert plain.layout.convs_per_level == (3, 3, 3, 3)
    n_plain = n_params(plain)
    assert 3.2e6 < n_plain < 3.45e6
    hyper = HyperUNet()
    n_hyper = n_params(hyper)
    assert 1.6e8 < n_hyper < 1.8e8
    # the heads output exactly the primary UNet's parameters
    assert sum(h.out_features for h in hyper.heads) == n_plain
    assert hyper.heads[0].in_features == 50  # the paper's embedding width


@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("convs", [1, (1, 2, 1)])
def test_heads_built_from_plain_unet(spatial_dims, convs):
    layout = dict(SMALL, convs_per_level=convs)
    plain = PlainUNet(spatial_dims=spatial_dims, **layout)
    hyper = HyperUNet(spatial_dims=spatial_dims, **layout)
    assert hyper.layout == plain.layout
    assert sum(h.out_features for h in hyper.heads) == n_params(plain)
    # one head per module that owns parameters
    owners = [m for m in plain.modules() if list(m.parameters(recurse=False))]
    assert len(hyper.heads) == len(owners)
    # the generated parameters have the names and shapes of the PlainUNet's
    params = hyper.generate_params(torch.ones(1, spatial_dims))[0]
    assert {k: tuple(v.shape) for k, v in params.items()} == {k: tuple(v.shape) for k, v in plain.named_parameters()}


def test_layout_validation():
    with pytest.raises(ValueError, match="spatial_dims"):
        UNetLayout(spatial_dims=4)
    with pytest.raises(ValueError, match="kernel_size"):
        UNetLayout(kernel_size=4)
    with pytest.raises(ValueError, match="up_kernel_size"):
        UNetLayout(up_kernel_size=3)
    with pytest.raises(ValueError, match="convs_per_level"):
        UNetLayout(channels=(4, 8, 16), convs_per_level=(1, 2))
    with pytest.raises(ValueError, match="convs_per_level"):
        UNetLayout(channels=(4, 8), convs_per_level=0)
    with pytest.raises(ValueError, match="channels"):
        UNetLayout(channels=())
    with pytest.raises(ValueError, match="out_channels"):
        UNetLayout(out_channels=0)
    with pytest.raises(ValueError, match="spatial_dims"):
        PlainUNet(spatial_dims=1)
    layout = UNetLayout(channels=(4, 8, 16), convs_per_level=(1, 2, 3))
    assert layout.levels == 3 and layout.divisor == 4
    assert layout.as_kwargs()["convs_per_level"] == [1, 2, 3]
    assert UNetLayout(**layout.as_kwargs()) == layout
