"""Tests of HyperNetwork, the spacing-conditioned weights of any nn.Module.

Shown: for the project's PlainUNet and MONAI's BasicUNet and SegResNet, the generated plain module
computes what the wrapper computes, a mixed-spacing batch equals its samples one by one, and
gradients reach the hypernetwork; a cache hit in eval mode does not run the heads and a parameter
change drops the cache; the generated modules script with TorchScript (ONNX is not installed in
this environment, so it is not tested); a subset of the parameters can be generated, the rest
staying shared and trainable; HyperUNet checkpoints keep their keys; a spacing-aware primary gets
the spacing of its own samples; and a wrapped BasicUNet learns the size-in-mm task of
tests/test_learning.py, which the same BasicUNet without the spacing cannot.
"""

import time
import warnings

import numpy as np
import pytest
import torch
from monai.losses import DiceCELoss
from monai.metrics import DiceMetric
from monai.networks.nets import BasicUNet, SegResNet
from monai.networks.utils import one_hot
from torch import nn

from custom_networks import HyperUNet, PlainUNet
from custom_networks.data.synthetic import ball_patch
from custom_networks.nets.hypernetwork import HyperNetwork

ATOL = 1e-5
SHAPE = (3, 1, 32, 16, 16)  # BasicUNet halves four times: 32 x 16 x 16 keeps two voxels at the bottom
S1, S2 = (1.0, 1.0, 2.0), (2.0, 2.0, 2.0)

PRIMARIES = {
    "PlainUNet": lambda: PlainUNet(spatial_dims=3, in_channels=1, out_channels=2, channels=(4, 8), convs_per_level=1),
    "BasicUNet": lambda: BasicUNet(spatial_dims=3, in_channels=1, out_channels=2, features=(4, 4, 8, 8, 16, 4)),
    # the default GroupNorm of 8 groups does not divide 4 filters
    "SegResNet": lambda: SegResNet(
        spatial_dims=3, init_filters=4, in_channels=1, out_channels=2, blocks_down=(1, 1), blocks_up=(1,),
        norm=("GROUP", {"num_groups": 2}),
    ),
}


def wrapped(name, seed=0, **kwargs):
    torch.manual_seed(seed)
    return HyperNetwork(PRIMARIES[name](), spatial_dims=3, **kwargs)


def inputs(seed=1):
    torch.manual_seed(seed)
    return torch.randn(SHAPE)


def max_diff(a, b):
    return float((a - b).abs().max())


# --------------------------------------------------------------------------- any primary network


@pytest.mark.parametrize("name", PRIMARIES)
def test_wrapper_equals_generated_module_and_batches_by_spacing(name):
    net = wrapped(name).eval()
    x = inputs()
    plain = net.generate(S1)
    assert type(plain) is type(PRIMARIES[name]()) and not plain.training
    with torch.no_grad():
        expected = net(x, torch.tensor(S1))
        torch.testing.assert_close(plain(x), expected, atol=ATOL, rtol=0)
        assert max_diff(net(x, torch.tensor(S2)), expected) > 1e-3  # the spacing matters

        # 3 samples, 2 distinct spacings: each sample gets its own spacing's network
        spacing = torch.tensor([S1, S2, S1])
        batched = net(x, spacing)
        one_by_one = torch.cat([net.generate(s)(x[i : i + 1]) for i, s in enumerate(spacing.tolist())])
        torch.testing.assert_close(batched, one_by_one, atol=ATOL, rtol=0)
        swapped = net(x, torch.tensor([S2, S1, S2]))
        assert min(max_diff(swapped[i], batched[i]) for i in range(3)) > 1e-3

    net.train()
    loss = net(x, spacing).square().mean()
    loss.backward()
    names = [n for n, _ in net.named_parameters()]
    assert names and all(n.startswith(("embed.", "heads.")) for n in names), names
    for n, p in net.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), n
    for i, head in enumerate(net.heads):
        assert head.weight.grad.abs().sum() > 0, f"head {i} of {name} got no gradient"
    assert net.embed[0].weight.grad.abs().sum() > 0


# --------------------------------------------------------------------------- eval-mode cache


def test_cache_hit_does_not_run_the_heads():
    net = wrapped("PlainUNet").eval()
    x = inputs()[:1]
    head_calls = []
    net.heads[0].register_forward_hook(lambda module, args, out: head_calls.append(args[0].shape[0]))

    def run(spacing):
        before, count = len(head_calls), net.generation_count
        with torch.no_grad():
            y = net(x, torch.tensor(spacing))
        return y, len(head_calls) - before, net.generation_count - count

    y1, calls, generated = run(S1)
    assert (calls, generated) == (1, 1)
    y1_hit, calls, generated = run(S1)
    assert (calls, generated) == (0, 0)
    torch.testing.assert_close(y1_hit, y1, atol=0, rtol=0)
    with torch.no_grad():  # a hit returns the very tensors of the first call
        assert net.params_for(torch.tensor([S1]))[0]["head.weight"] is net.params_for(torch.tensor([S1]))[0]["head.weight"]
    assert run(S2)[1:] == (1, 1)
    assert run(S1)[1:] == run(S2)[1:] == (0, 0)

    # an Adam step invalidates the cache
    net.train()
    optimizer = torch.optim.Adam(net.parameters(), 1e-2)
    net(x, torch.tensor(S1)).square().mean().backward()
    optimizer.step()
    net.eval()
    y_step, calls, generated = run(S1)
    assert (calls, generated) == (1, 1)
    assert max_diff(y_step, y1) > 1e-4
    with torch.no_grad():
        torch.testing.assert_close(y_step, net.generate(S1)(x), atol=ATOL, rtol=0)
    assert run(S1)[1:] == (0, 0)

    # so does load_state_dict with other values
    other = wrapped("PlainUNet", seed=7).eval()
    with torch.no_grad():
        y_other = other(x, torch.tensor(S1))
    assert max_diff(y_other, y_step) > 1e-4
    net.load_state_dict(other.state_dict())
    y_loaded, calls, generated = run(S1)
    assert (calls, generated) == (1, 1)
    torch.testing.assert_close(y_loaded, y_other, atol=ATOL, rtol=0)

    # with gradients enabled, nothing is cached
    before = len(head_calls)
    net(x, torch.tensor(S1))
    assert len(head_calls) == before + 1


# --------------------------------------------------------------------------- export


@pytest.mark.parametrize("name", ["PlainUNet", "BasicUNet"])
def test_generated_module_scripts(name):
    net = wrapped(name).eval()
    x = inputs()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TorchScript deprecation warning of this torch version
        scripted = torch.jit.script(net.generate(S1))
    with torch.no_grad():
        expected = net(x, torch.tensor(S1))
        torch.testing.assert_close(scripted(x), expected, atol=ATOL, rtol=0)


# --------------------------------------------------------------------------- a subset of the parameters


@pytest.mark.parametrize(
    "generate", [["down.*", "up.*"], lambda name, module: not name.startswith("head.")], ids=["patterns", "predicate"]
)
def test_subset_generated_head_shared(generate):
    net = wrapped("PlainUNet", generate=generate).eval()
    primary = PRIMARIES["PlainUNet"]()
    n_head = sum(p.numel() for p in primary.head.parameters())
    assert sum(h.out_features for h in net.heads) == sum(p.numel() for p in primary.parameters()) - n_head
    assert [n for n, _ in net.named_parameters() if n.startswith("static.")] == ["static.0", "static.1"]
    head_weight = net.static[0]
    assert head_weight.shape == primary.head.weight.shape and head_weight.requires_grad

    x = inputs()
    with torch.no_grad():
        p1, p2 = net.params_for(torch.tensor([S1, S2]))
        assert p1["head.weight"] is head_weight and p2["head.weight"] is head_weight
        assert max_diff(p1["down.0.0.0.weight"], p2["down.0.0.0.weight"]) > 0
        y1, y2 = net(x, torch.tensor(S1)), net(x, torch.tensor(S2))
        assert max_diff(y1, y2) > 1e-3
        for s in (S1, S2):
            generated = net.generate(s)
            torch.testing.assert_close(generated.head.weight, head_weight, atol=0, rtol=0)
            torch.testing.assert_close(generated(x), net(x, torch.tensor(s)), atol=ATOL, rtol=0)

    net.train()
    net(x, torch.tensor([S1, S2, S1])).square().mean().backward()
    assert head_weight.grad is not None and head_weight.grad.abs().sum() > 0
    assert net.static[1].grad.abs().sum() > 0
    assert all(head.weight.grad.abs().sum() > 0 for head in net.heads)


@pytest.mark.parametrize("generate", [[], ["nothing.*"], lambda name, module: False], ids=["empty", "no-match", "predicate"])
def test_empty_selection_raises(generate):
    with pytest.raises(ValueError, match="generate"):
        wrapped("PlainUNet", generate=generate)


# --------------------------------------------------------------------------- HyperUNet checkpoints


def test_hyper_unet_checkpoint_keys_and_loading():
    layout = dict(spatial_dims=3, in_channels=1, out_channels=2, channels=(4, 8, 16), convs_per_level=1)
    torch.manual_seed(0)
    net = HyperUNet(**layout).eval()
    # the keys of checkpoints saved before HyperUNet became a HyperNetwork
    expected = [f"embed.{i}.{w}" for i in (0, 2, 4) for w in ("weight", "bias")]
    expected += [f"heads.{i}.{w}" for i in range(len(net.heads)) for w in ("weight", "bias")]
    assert sorted(net.state_dict()) == sorted(expected)

    torch.manual_seed(1)
    other = HyperUNet(**layout).eval()
    x = inputs()
    with torch.no_grad():
        y_other = other(x, torch.tensor([S1, S2, S1]))
        assert max_diff(net(x, torch.tensor([S1, S2, S1])), y_other) > 1e-3
        net.load_state_dict(other.state_dict())
        torch.testing.assert_close(net(x, torch.tensor([S1, S2, S1])), y_other, atol=0, rtol=0)


# --------------------------------------------------------------------------- a spacing-aware primary


class SpacingEcho(nn.Module):
    """Channels 0-1: a 1x1 conv of the input; channels 2-4: the spacing it was given, per sample."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv3d(1, 2, 1)
        self.batch_sizes = []

    def forward(self, x, spacing):
        self.batch_sizes.append(x.shape[0])
        return torch.cat([self.conv(x), spacing[:, :, None, None, None].expand(-1, -1, *x.shape[2:])], 1)


def test_spacing_aware_primary_gets_each_samples_spacing():
    net = HyperNetwork(SpacingEcho())
    assert net.pass_spacing
    spacing = torch.tensor([S1, S2, S1, (0.5, 0.7, 3.0)])
    x = torch.randn(4, 1, 4, 4, 4)
    with torch.no_grad():
        y = net(x, spacing)
    torch.testing.assert_close(y[:, 2:, 2, 1, 3], spacing, atol=0, rtol=0)
    # one call per distinct spacing, the samples sharing S1 together
    assert sorted(net.primary.batch_sizes) == [1, 1, 2]


# --------------------------------------------------------------------------- learning


LEARN_PATCH = (16, 16, 32)  # BasicUNet halves four times: 32 voxels keep two at the bottom
LEARN_FEATURES = (4, 4, 8, 8, 16, 4)
LEARN_BATCH = 4
LEARN_STEPS = 400
LEARN_LR = 3e-3
# a ball of 2.5 voxels radius is background at 1 mm and foreground at 2 mm: a network blind to the
# spacing cannot get both; the training range holds both inside it
TRAIN_SPACINGS_MM = (0.8, 2.2)
TEST_SPACINGS_MM = (1.0, 1.5, 2.0)


def ball_batch(spacing, rng, n, large=None):
    """``n`` single-ball patches of tests/test_learning.py at isotropic ``spacing`` mm, each large
    (foreground) with probability 1/2 or as ``large`` says."""
    large = large or [None] * n  # drawn in turn with each patch, so the stream is one per seed
    images, labels = zip(
        *(ball_patch((spacing,) * 3, LEARN_PATCH, large=bool(rng.rand() < 0.5) if big is None else big, rng=rng) for big in large)
    )
    return torch.from_numpy(np.stack(images)), torch.from_numpy(np.stack(labels)).long(), torch.full((n, 3), spacing)


def logits(net, x, spacing):
    return net(x, spacing) if isinstance(net, HyperNetwork) else net(x)


def train_and_test(net, seed):
    """Adam on the same stream of patches (one spacing per batch); foreground Dice per test spacing."""
    torch.manual_seed(seed)
    rng = np.random.RandomState(seed)
    optimizer = torch.optim.Adam(net.parameters(), LEARN_LR)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, LEARN_STEPS)  # ends on settled weights
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True, batch=True)
    net.train()
    for _ in range(LEARN_STEPS):
        x, y, spacing = ball_batch(rng.uniform(*TRAIN_SPACINGS_MM), rng, LEARN_BATCH)
        optimizer.zero_grad()
        loss_fn(logits(net, x, spacing), y).backward()
        optimizer.step()
        schedule.step()
    net.eval()
    dice = {}
    with torch.no_grad():
        for s in TEST_SPACINGS_MM:
            x, y, spacing = ball_batch(s, np.random.RandomState(123), 16, large=[i % 2 == 0 for i in range(16)])
            metric = DiceMetric(include_background=False, ignore_empty=False)  # a ball-free patch counts: 1 if left empty
            metric(one_hot(logits(net, x, spacing).argmax(1, keepdim=True), 2), one_hot(y, 2))
            dice[s] = round(float(metric.aggregate()), 3)
    return dice


def test_wrapped_basic_unet_learns_size_in_mm():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        results = {}
        for name in ("hyper", "spacing-blind"):
            torch.manual_seed(0)
            net = BasicUNet(spatial_dims=3, in_channels=1, out_channels=2, features=LEARN_FEATURES)
            if name == "hyper":
                net = HyperNetwork(net, spatial_dims=3)
            start = time.perf_counter()
            results[name] = train_and_test(net, seed=0)
            print(name, "Dice per spacing", results[name], f"{time.perf_counter() - start:.1f} s")
    finally:
        torch.set_num_threads(threads)
    hyper, blind = np.mean(list(results["hyper"].values())), np.mean(list(results["spacing-blind"].values()))
    # seeds 0, 1, 2 gave mean Dice 0.94 / 0.98 / 0.80 (hyper) and 0.48 / 0.81 / 0.52 (spacing-blind)
    assert hyper > 0.75, results
    assert hyper - blind > 0.15, results
