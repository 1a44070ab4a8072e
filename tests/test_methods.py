"""The training methods: ALGORITHM.md properties 1, 3, 4 and 5, and one-step behaviour."""
import copy
import math

import pytest
import torch

from atcd_ray.core.methods import METHODS
from atcd_ray.core import hmc as hmc_module
from atcd_ray.core.methods.atcd import ATCDOptions
from atcd_ray.core.methods.free import FreeOptions

from .conftest import TinyNet

EPS = 0.1
BATCH = 16  # examples per generated minibatch


class Recorder(torch.nn.Module):
    """Wraps a network: records every input it sees and counts forward and backward passes, in
    minibatches of BATCH examples (ATCD re-runs only the rejected rows after an M-H test: a
    fraction of a pass)."""

    def __init__(self, net):
        super().__init__()
        self.net = net
        self.inputs, self.forwards, self.backwards = [], 0.0, 0.0

    def forward(self, x):
        self.inputs.append(x.detach().clone())
        self.forwards += len(x) / BATCH
        out = self.net(x)
        if out.requires_grad:
            out.register_hook(self._count_backward)
        return out

    def _count_backward(self, grad):
        self.backwards += len(grad) / BATCH


def make(name, options=None, seed=0, net=None):
    torch.manual_seed(seed)
    model = Recorder(net or TinyNet())
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    return METHODS[name](model, opt, EPS, options or METHODS[name].Options())


def batches(n=4, seed=3):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        x = torch.rand(BATCH, 1, 12, 12, generator=gen)
        x[:, :, :2] = 0.0
        x[:, :, -2:] = 1.0
        out.append((x, torch.randint(0, 10, (BATCH,), generator=gen)))
    return out


ALL_CONFIGS = {
    "natural": None, "pgd": None, "free": FreeOptions(replays=3, init="uniform"), "fast": None,
    "atcd": ATCDOptions(T=2, K=2), "atcd_reuse": ATCDOptions(T=3, K=2, reuse_grad=True),
    "atcd_uniform_exact": ATCDOptions(T=2, K=1, init="uniform", cd_target="exact", momentum=False),
}


@pytest.mark.parametrize("config", ALL_CONFIGS)
def test_every_training_input_is_in_the_ball(config):
    """Property 1 for the methods: every input a method feeds the network is within eps of x, in [0, 1]."""
    method = make(config.split("_")[0], ALL_CONFIGS[config])
    for x, y in batches():
        method.model.inputs.clear()
        stats = method.step(x, y)
        assert all(math.isfinite(v) for v in stats.values())
        for seen in method.model.inputs:  # all rows, or (ATCD after an M-H test) some of them
            nearest = (seen[:, None] - x[None]).abs().flatten(2).amax(2).min(1).values
            assert nearest.max() <= EPS + 1e-6
            assert seen.min() >= 0 and seen.max() <= 1


def test_atcd_special_case_is_free():
    """Property 3: ATCD with K=1, rho=0, no M-H, no momentum, eta=eps, reuse_grad, carry is Free-T."""
    T = 3
    free = make("free", FreeOptions(replays=T, init="uniform"))
    atcd = make("atcd", ATCDOptions(T=T, K=1, rho=0.0, mh=False, momentum=False, eta=EPS,
                                    reuse_grad=True, init="carry"))
    torch.manual_seed(11)  # both draw their random starts from here
    for x, y in batches(5):
        free.step(x, y)
    torch.manual_seed(11)
    for x, y in batches(5):
        atcd.step(x, y)
    assert len(free.model.inputs) == len(atcd.model.inputs) == 5 * T
    for a, b in zip(free.model.inputs, atcd.model.inputs):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    for a, b in zip(free.model.parameters(), atcd.model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert not torch.equal(free.model.net.fc.weight, make("free").model.net.fc.weight)  # they did train


@pytest.mark.parametrize("T,K", [(1, 1), (2, 1), (2, 3), (4, 2)])
@pytest.mark.parametrize("reuse,order", [(False, "kick_drift"), (True, "kick_drift"), (True, "drift_kick")])
@pytest.mark.parametrize("mh", [False, True])
def test_atcd_passes_per_minibatch(T, K, reuse, order, mh):
    """Property 4: backward passes are T (K + 1), or T K with reuse_grad, counted on the network
    in minibatches; the M-H test adds, per replay, at most a re-run of its rejected rows (forward
    and backward, docs/ALGORITHM_NOTES.md), so at most one minibatch per replay, and under
    reuse_grad, whose first step makes no pass at the replay's start, one forward without backward
    for H_old there."""
    method = make("atcd", ATCDOptions(T=T, K=K, reuse_grad=reuse, order=order, mh=mh))
    for i, (x, y) in enumerate(batches(3)):
        before_f, before_b = method.model.forwards, method.model.backwards
        method.step(x, y)
        backwards = method.model.backwards - before_b
        forwards = method.model.forwards - before_f
        passes = T * K if reuse else T * (K + 1)
        assert passes <= backwards <= passes + (T if mh else 0) + 1e-9
        # a fresh chain's first replay under reuse_grad makes no step (with K = 1): nothing to test
        energy_forwards = (T - (i == 0 and K == 1)) if mh and reuse else 0
        assert forwards == pytest.approx(backwards + energy_forwards)  # the rest are backpropagated


def test_free_passes_per_minibatch():
    method = make("free", FreeOptions(replays=4))
    method.step(*batches(1)[0])
    assert method.model.forwards == method.model.backwards == 4


def _record_mh(monkeypatch):
    diffs = []
    real = hmc_module.mh_log_accept

    def spy(h_old, h_new, tau):
        diffs.append(h_old - h_new)
        return real(h_old, h_new, tau)

    monkeypatch.setattr(hmc_module, "mh_log_accept", spy)
    return diffs


def test_mh_infinite_temperature_accepts_everything(monkeypatch):
    """Property 5: tau -> infinity gives acceptance rate 1."""
    diffs = _record_mh(monkeypatch)
    method = make("atcd", ATCDOptions(T=3, K=2, tau=math.inf))
    rates = [method.step(x, y)["mh_accept_rate"] for x, y in batches(3)]
    assert rates == [1.0, 1.0, 1.0]
    assert any((d < 0).any() for d in diffs)  # some proposals raised H and were still accepted


def test_mh_zero_temperature_keeps_only_proposals_that_lower_h(monkeypatch):
    """Property 5: tau -> 0 keeps exactly the proposals with H_new <= H_old, and reverts the rest."""
    diffs = _record_mh(monkeypatch)
    # kappa 0.2: on this untrained net a larger kappa rejects everything, a smaller one (the masks
    # shared, H moves little) nothing.
    method = make("atcd", ATCDOptions(T=3, K=2, tau=0.0, kappa=0.2))
    rates = []
    for x, y in batches(4):
        diffs.clear()
        method.model.inputs.clear()
        rates.append(method.step(x, y)["mh_accept_rate"].item())
        lowered = torch.cat([(d >= 0).float() for d in diffs])
        assert rates[-1] == pytest.approx(lowered.mean().item())
    assert 0 < sum(rates) / len(rates) < 1  # both cases occur, so the test is not vacuous


def test_mh_rejected_examples_revert(monkeypatch):
    """With tau = 0 and every proposal raising H, the replay trains on its starting state."""
    monkeypatch.setattr(hmc_module, "mh_log_accept", lambda h_old, h_new, tau: torch.full_like(h_old, -math.inf))
    method = make("atcd", ATCDOptions(T=2, K=1, tau=0.0, init="uniform"))
    x, y = batches(1)[0]
    method.step(x, y)
    inputs = method.model.inputs  # per replay: trajectory forward (at the start), proposal, re-forward
    assert len(inputs) == 2 * 3
    torch.testing.assert_close(inputs[2], inputs[0])  # replay 1 trains on its start state
    assert not torch.equal(inputs[1], inputs[0])  # although the proposal moved


def test_atcd_chain_persists_across_minibatches():
    method = make("atcd", ATCDOptions(T=2, K=1, mh=False))
    (x, y), (x2, y2) = batches(2)
    method.step(x, y)
    carried = method.delta.clone()
    method.model.inputs.clear()
    method.step(x2, y2)
    # The first forward on the new minibatch starts from the carried chain, projected onto x2.
    torch.testing.assert_close(method.model.inputs[0], x2 + (x2 + carried.clamp(-EPS, EPS)).clamp(0, 1) - x2)
    assert set(method.state_dict()) == {"delta", "v"}


@pytest.mark.parametrize("name", ["natural", "pgd", "free", "fast", "atcd"])
def test_method_state_round_trip(name):
    method = make(name)
    for x, y in batches(2):
        method.step(x, y)
    state = method.state_dict()
    fresh = make(name)
    fresh.load_state_dict(copy.deepcopy(state))
    for key, value in state.items():
        torch.testing.assert_close(fresh.state_dict()[key], value)


@pytest.mark.parametrize("name", ["natural", "pgd", "free", "fast", "atcd"])
def test_training_loss_decreases(name, digits_splits):
    """A few steps on real data lower the method's own training loss."""
    method = make(name, net=TinyNet())
    x, y = next(iter(digits_splits.train))
    first = method.step(x, y)["loss"]
    for _ in range(15):
        last = method.step(x, y)["loss"]
    assert last < first


def test_fast_early_stop_restores_last_good_weights(digits_splits):
    from atcd_ray.core.methods.fast import FastOptions

    method = make("fast", FastOptions(early_stop=True, early_stop_drop=0.0), net=TinyNet())
    batch = next(iter(digits_splits.train))
    method.previous_robust_acc = 2.0  # any accuracy is now a collapse
    method.best_state = copy.deepcopy(method.model.state_dict())
    good = copy.deepcopy(method.model.state_dict())
    method.step(*batch)
    assert method.end_epoch(batch) is True
    for key, value in good.items():
        torch.testing.assert_close(method.model.state_dict()[key], value)
