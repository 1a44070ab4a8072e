"""TRADES, YOPO, TRADES+YOPO, Robust-Overfitting: one-step behaviour and YOPO's co-state."""
import pytest
import torch
import torch.nn.functional as F

from atcd_ray.core.methods import METHODS
from atcd_ray.core.methods.yopo import YOPOOptions, forward_keeping_z1
from atcd_ray.core.models import build_model, first_layer, first_layer_output

EPS = 0.1
NEW = ["trades", "yopo", "trades-yopo", "robust-overfitting"]


def registry_method(name, options=None):
    torch.manual_seed(0)
    model = build_model("smallcnn", 10, 1)
    options = options or METHODS[name].Options()
    lr = 0.05 / options.m if name == "yopo" else 0.05  # YOPO sums m gradients per step
    return METHODS[name](model, torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9), EPS, options)


@pytest.mark.parametrize("name", NEW)
def test_every_input_is_in_the_ball(name, random_batch):
    """Property 1: every input reaching the first layer (full and first-layer-only passes) is in
    the eps-ball and [0, 1]. SmallCNN has no normalisation, so the first layer sees x itself."""
    method = registry_method(name, YOPOOptions(m=2, n=3) if "yopo" in name else None)
    seen = []
    first_layer(method.model).register_forward_pre_hook(lambda module, args: seen.append(args[0].detach()))
    x = torch.nn.functional.interpolate(random_batch[0], size=28)
    method.step(x, random_batch[1])
    assert len(seen) > 2
    for inp in seen:
        assert (inp - x).abs().max() <= EPS + 1e-6 and inp.min() >= 0 and inp.max() <= 1


@pytest.mark.parametrize("name", NEW)
def test_training_loss_decreases(name, digits_splits):
    method = registry_method(name, YOPOOptions(m=2, n=2) if "yopo" in name else None)
    x, y = next(iter(digits_splits.train))
    first = method.step(x, y)["loss"]
    for _ in range(15):
        last = method.step(x, y)["loss"]
    assert last < first


@pytest.mark.parametrize("name,shape", [("smallcnn", (3, 1, 28, 28)), ("preactresnet18", (3, 3, 32, 32))])
def test_yopo_costate_matches_autograd(name, shape):
    """p = -dL/dz1 turns the first layer alone into the full input gradient:
    grad_x <z1(x), -p> = grad_x L, in float64, to rounding."""
    torch.manual_seed(0)
    model = build_model(name, 10, shape[1], mean=[0.5] * shape[1], std=[0.3] * shape[1]).double().eval()
    for param in model.parameters():  # SmallCNN's zero last layer would make every gradient zero
        torch.nn.init.normal_(param, std=0.1)
    x, y = torch.rand(shape, dtype=torch.double), torch.randint(0, 10, (shape[0],))
    loss, _, z1 = forward_keeping_z1(model, x, lambda out: F.cross_entropy(out, y, reduction="sum"))
    (grad_z1,) = torch.autograd.grad(loss, z1)
    x_full = x.clone().requires_grad_(True)
    (g_full,) = torch.autograd.grad(F.cross_entropy(model(x_full), y, reduction="sum"), x_full)
    x_one = x.clone().requires_grad_(True)
    (g_one,) = torch.autograd.grad((first_layer_output(model, x_one) * grad_z1).sum(), x_one)
    assert g_full.abs().max() > 1e-6
    torch.testing.assert_close(g_one, g_full, rtol=1e-10, atol=1e-12)


def test_yopo_takes_one_optimiser_step_per_minibatch(random_batch):
    method = registry_method("yopo", YOPOOptions(m=3, n=2))
    steps = []
    method.optimizer.register_step_post_hook(lambda *args: steps.append(1))
    method.step(torch.nn.functional.interpolate(random_batch[0], size=28), random_batch[1])
    assert len(steps) == 1
