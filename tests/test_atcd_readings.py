"""ATCD's readings of Algorithm 1 (init, kick, order, mh_start, dropout masks) and N-FGSM: each
does what docs/ALGORITHM_NOTES.md says, on generated data; each trains on the digits and resumes
bit for bit."""
import json
import math

import pytest
import torch

from atcd_ray import trainer
from atcd_ray.core import hmc as hmc_module
from atcd_ray.core.checkpoint import Checkpoint
from atcd_ray.core.hmc import kick
from atcd_ray.core.methods.atcd import ATCDOptions
from atcd_ray.core.methods.nfgsm import NFGSMOptions
from tests.conftest import TinyNet
from tests.test_checkpoint import crash_in_epoch_3, quick_config
from tests.test_methods import EPS, batches, make


def test_carry_delta_keeps_the_position_and_restarts_the_momentum():
    method = make("atcd", ATCDOptions(T=2, K=1, mh=False, init="carry_delta"))
    (x, y), (x2, y2) = batches(2)
    method.step(x, y)
    carried = method.delta.clone()
    assert not torch.equal(method.v, carried)  # the momentum it ends with is not its position
    start = method._start(x2)
    expected = (x2 + carried.clamp(-EPS, EPS)).clamp(0, 1) - x2
    torch.testing.assert_close(start.delta, expected)
    torch.testing.assert_close(start.v, expected)  # v restarts at the start's offset (v_0 = theta^0 - x)
    carry = make("atcd", ATCDOptions(T=2, K=1, mh=False, init="carry"))
    carry.delta, carry.v = method.delta, method.v
    assert torch.equal(carry._start(x2).v, method.v)  # control: carry keeps the momentum


def test_uniform_start_draws_a_fresh_chain_every_minibatch():
    method = make("atcd", ATCDOptions(T=2, K=1, mh=False, init="uniform"))
    (x, y), (x2, _) = batches(2)
    method.step(x, y)
    torch.manual_seed(5)
    start = method._start(x2)
    torch.manual_seed(5)
    fresh = (x2 + torch.empty_like(x2).uniform_(-EPS, EPS).clamp(-EPS, EPS)).clamp(0, 1) - x2
    torch.testing.assert_close(start.delta, fresh)
    torch.testing.assert_close(start.v, fresh)


def test_gradient_kick_has_mean_magnitude_alpha_and_ignores_the_gradient_scale():
    grad = torch.randn(4, 1, 6, 6) * torch.tensor([1e-6, 1.0, 30.0, 1e3]).view(4, 1, 1, 1)
    zero = torch.zeros_like(grad)
    step = kick(zero, grad, alpha=0.02, eps=10.0, direction="gradient")  # eps large: no clipping
    torch.testing.assert_close(step.abs().flatten(1).mean(1), torch.full((4,), 0.02))
    torch.testing.assert_close(kick(zero, grad * 7.5, alpha=0.02, eps=10.0, direction="gradient"), step)
    assert torch.equal(torch.sign(step), torch.sign(grad))
    signed = kick(zero, grad, alpha=0.02, eps=10.0)  # control: sign kicks every coordinate by alpha
    assert torch.equal(signed.abs(), torch.full_like(grad, 0.02)) and not torch.equal(signed, step)
    assert kick(zero, grad, alpha=1.0, eps=0.1, direction="gradient").abs().max() <= 0.1  # clipped to eps


def test_drift_kick_moves_along_the_old_momentum():
    """Both orders take the gradient at the step's start (Stage 0's U at theta^(k-1)); drift_kick
    then moves along v_0, kick_drift along the kicked momentum: with K = 1 drift_kick's proposal
    is theta^0 + eta sign(v_0) whatever the gradient, and the momentum both end with is the same."""
    x, y = batches(1)[0]
    ends = {}
    for order in ("drift_kick", "kick_drift"):
        method = make("atcd", ATCDOptions(T=1, K=1, mh=False, init="uniform", order=order))
        torch.manual_seed(3)
        method.step(x, y)
        torch.manual_seed(3)
        start = (x + torch.empty_like(x).uniform_(-EPS, EPS)).clamp(0, 1) - x
        trajectory, update = method.model.inputs
        torch.testing.assert_close(trajectory, x + start)  # the gradient at theta^0, in both
        along_v0 = x + ((x + (start + EPS * start.sign()).clamp(-EPS, EPS)).clamp(0, 1) - x)
        assert torch.allclose(update, along_v0) == (order == "drift_kick")
        ends[order] = method.v
    torch.testing.assert_close(ends["drift_kick"], ends["kick_drift"])


def _h_old(monkeypatch):
    seen = []
    real = hmc_module.mh_log_accept

    def spy(h_old, h_new, tau):
        seen.append((h_old.clone(), h_new.clone()))
        return real(h_old, h_new, tau)

    monkeypatch.setattr(hmc_module, "mh_log_accept", spy)
    return seen


@pytest.mark.parametrize("lr", [0.0, 0.5])
def test_reuse_grad_tests_one_energy_function(lr, monkeypatch):
    """Under reuse_grad, H_old at a replay's start is U by the weights of H_new (mh_start =
    evaluate): with frozen weights (lr 0) it equals the old way's (the last update's forward);
    once the weights move it does not, which is the difference the fix removes."""
    runs = {}
    for mode in ("evaluate", "reuse"):
        seen = _h_old(monkeypatch)
        torch.manual_seed(0)
        net = TinyNet()  # the same initial weights in both modes
        net.drop.p = 0.0  # no mask noise: only the weights can make the two energies differ
        method = make("atcd", ATCDOptions(T=3, K=1, reuse_grad=True, mh_start=mode, kappa=0.0), net=net)
        for group in method.optimizer.param_groups:
            group["lr"] = lr
        torch.manual_seed(0)
        method.step(*batches(1)[0])
        runs[mode] = seen
        monkeypatch.undo()
    # reuse: replays 2 and 3 are tested (the first trains at the fresh start); evaluate: the same two
    assert len(runs["evaluate"]) == len(runs["reuse"]) == 2
    for (old_e, new_e), (old_r, new_r) in zip(runs["evaluate"], runs["reuse"]):
        if lr == 0:
            torch.testing.assert_close(old_e, old_r, rtol=1e-5, atol=1e-5)
        else:
            assert (old_e - old_r).abs().max() > 1e-3


def test_reuse_grad_tests_the_first_replay_of_a_carried_chain(monkeypatch):
    """With mh_start = evaluate the first replay on a new minibatch is tested too (its start is
    evaluated on this x); the old way could not, having no energy there."""
    counts = {}
    for mode in ("evaluate", "reuse"):
        seen = _h_old(monkeypatch)
        method = make("atcd", ATCDOptions(T=2, K=1, reuse_grad=True, mh_start=mode))
        for x, y in batches(2):
            method.step(x, y)
        counts[mode] = len(seen)
        monkeypatch.undo()
    assert counts == {"evaluate": 1 + 2, "reuse": 1 + 1}


@pytest.mark.parametrize("shared", [True, False])
def test_one_dropout_mask_per_replay(shared, monkeypatch):
    """A network with dropout (TinyNet's): with one mask per replay, a proposal that barely moves
    (eta 1e-6, kappa 0) has H_new = H_old to 1e-3; with a mask per forward (the control) the
    mask noise alone moves H by far more."""
    seen = _h_old(monkeypatch)
    method = make("atcd", ATCDOptions(T=2, K=1, eta=1e-6, kappa=0.0, init="uniform"))
    method.shared_masks = shared
    for x, y in batches(2):
        method.step(x, y)
    gap = max((old - new).abs().max().item() for old, new in seen)
    assert (gap < 1e-3) if shared else (gap > 0.05), gap


def _no_dropout_net():
    torch.manual_seed(0)
    net = TinyNet()
    net.drop.p = 0.0
    return net


@pytest.mark.parametrize("clip", [False, True])
def test_nfgsm_is_its_definition(clip):
    """N-FGSM: x + U(-k eps, k eps) clipped to [0, 1], one step of alpha_factor eps along the
    signed gradient there, then only [0, 1] (or, with clip, the eps-ball too); 2 passes."""
    options = NFGSMOptions(k=2.0, alpha_factor=1.0, clip=clip)
    method, reference = make("nfgsm", options, net=_no_dropout_net()), _no_dropout_net()
    x, y = batches(1)[0]
    torch.manual_seed(4)
    method.step(x, y)
    noisy, trained = method.model.inputs
    torch.manual_seed(4)
    expected_noisy = (x + torch.empty_like(x).uniform_(-2 * EPS, 2 * EPS)).clamp(0, 1)
    torch.testing.assert_close(noisy, expected_noisy)
    noisy_in = expected_noisy.clone().requires_grad_(True)  # the gradient there, by the same weights
    torch.nn.functional.cross_entropy(reference(noisy_in), y, reduction="sum").backward()
    delta = expected_noisy - x + EPS * noisy_in.grad.sign()
    expected = (x + delta.clamp(-EPS, EPS)).clamp(0, 1) if clip else (x + delta).clamp(0, 1)
    torch.testing.assert_close(trained, expected)
    distance = (trained - x).abs().max().item()
    assert distance <= (EPS if clip else 3 * EPS) + 1e-6 and trained.min() >= 0 and trained.max() <= 1
    if not clip:
        assert distance > EPS  # it does leave the eps-ball: no projection, by design
    assert method.model.forwards == method.model.backwards == 2


READINGS = [{"methods.atcd.init": "uniform"}, {"methods.atcd.init": "carry_delta"},
            {"methods.atcd.kick": "gradient"}, {"methods.atcd.order": "drift_kick", "methods.atcd.reuse_grad": True},
            {"methods.atcd.reuse_grad": True, "methods.atcd.mh_start": "reuse"},
            # SmallCNN has dropout (the digits recipe's CompactCNN has none): ATCD's per-replay masks
            # resumed bit for bit. N-FGSM on it too: on 256 images in 3 epochs CompactCNN learns no
            # robustness from it (0/64 PGD-5), SmallCNN some (10/64).
            {"model": "smallcnn"}, {"train.method": "nfgsm", "model": "smallcnn"}]


@pytest.mark.parametrize("reading", READINGS, ids=lambda r: ",".join(f"{k}={v}" for k, v in r.items()))
def test_each_reading_trains_on_the_digits_and_resumes_bit_for_bit(reading, tmp_path, monkeypatch):
    cfg = quick_config(**{"train.method": "atcd", "methods.atcd.T": 2, "methods.atcd.K": 1, **reading})
    straight = trainer.fit(cfg, tmp_path / "straight", progress=False)
    assert straight["robust_acc"]["pgd5"] > 0.15  # trained: chance is 0.1 (an untrained net has ~0)
    crash_in_epoch_3(cfg, tmp_path / "crashed", monkeypatch)
    resumed = trainer.fit(cfg, tmp_path / "crashed", progress=False)
    a = Checkpoint(tmp_path / "straight" / "last.safetensors")
    b = Checkpoint(tmp_path / "crashed" / "last.safetensors")
    assert set(a.tensors) == set(b.tensors)
    for key, tensor in a.tensors.items():
        assert torch.equal(tensor, b.tensors[key]), key  # weights, optimiser, chain, RNG
    assert resumed["robust_acc"] == straight["robust_acc"]
    lines = (tmp_path / "crashed" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2, 3]
    assert math.isfinite(json.loads(lines[-1])["train_loss"])
