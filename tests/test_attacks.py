"""The threat model and the attacks: eps-ball and [0, 1] on random inputs, side effects, strength."""
import pytest
import torch

from atcd_ray.core.attacks import autoattack, build_attack, cw_inf, fgsm, mifgsm, pgd, square, torchattacks_pgd
from atcd_ray.core.hmc import hmc_attack
from atcd_ray.core.rays import rays
from atcd_ray.core.engine import evaluate
from atcd_ray.core.threat import project, uniform_start

TOL = 1e-6
EPS = [0.0, 0.03, 0.3]

ATTACKS = {
    "fgsm": lambda m, x, y, e: fgsm(m, x, y, e),
    "pgd": lambda m, x, y, e: pgd(m, x, y, e, alpha=e / 4, steps=5),
    "pgd_restarts": lambda m, x, y, e: pgd(m, x, y, e, alpha=e / 2, steps=3, restarts=3),
    "pgd_no_start": lambda m, x, y, e: pgd(m, x, y, e, alpha=2 * e, steps=3, random_start=False),
    "mifgsm": lambda m, x, y, e: mifgsm(m, x, y, e, alpha=e / 4, steps=5),
    "cw": lambda m, x, y, e: cw_inf(m, x, y, e, alpha=e / 4, steps=5),
    "torchattacks_pgd": lambda m, x, y, e: torchattacks_pgd(m, x, y, e, alpha=e / 4, steps=5),
    "hmc": lambda m, x, y, e: hmc_attack(m, x, y, e, proposals=5),
    "rays": lambda m, x, y, e: rays(m, x, y, e, queries=60),
    "square": lambda m, x, y, e: square(m, x, y, e, queries=30),
    "autoattack": lambda m, x, y, e: autoattack(m, x, y, e),
}


def assert_in_ball(x_adv, x, eps):
    assert x_adv.shape == x.shape
    assert (x_adv - x).abs().max().item() <= eps + TOL
    assert x_adv.min().item() >= 0.0 and x_adv.max().item() <= 1.0


@pytest.mark.parametrize("eps", EPS)
@pytest.mark.parametrize("seed", range(3))
def test_projection_and_start_stay_in_ball(eps, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(32, 3, 5, 5, generator=gen)
    wild = (torch.rand(32, 3, 5, 5, generator=gen) - 0.5) * 4  # far outside the ball
    assert_in_ball(x + project(wild, x, eps), x, eps)
    torch.manual_seed(seed)
    assert_in_ball(x + uniform_start(x, eps), x, eps)


# AutoAttack runs every sub-attack in full on unbroken points: on this tiny net only a large eps
# keeps it to seconds; its eps-ball check at that eps is the one that matters.
BALL_CASES = [(n, e) for n in ATTACKS for e in EPS if n != "autoattack" or e == 0.3]


@pytest.mark.parametrize("name,eps", BALL_CASES)
def test_attacks_stay_in_ball_and_box(name, eps, tiny_net, random_batch):
    x, y = random_batch
    for seed in range(2):
        torch.manual_seed(seed)
        assert_in_ball(ATTACKS[name](tiny_net, x, y, eps), x, eps)


@pytest.mark.parametrize("name", ATTACKS)
@pytest.mark.parametrize("training", [True, False])
def test_attacks_leave_parameter_grads_and_mode_as_found(name, training, tiny_net, random_batch):
    x, y = random_batch
    tiny_net.train(training)
    tiny_net.fc.weight.grad = torch.full_like(tiny_net.fc.weight, 3.0)  # a gradient the caller owns
    ATTACKS[name](tiny_net, x, y, 0.3)
    assert tiny_net.training is training
    assert torch.equal(tiny_net.fc.weight.grad, torch.full_like(tiny_net.fc.weight, 3.0))
    assert tiny_net.conv.weight.grad is None


def test_pgd_beats_fgsm_on_a_trained_model(trained_digits_model, digits_splits):
    torch.manual_seed(0)
    acc = evaluate(trained_digits_model, digits_splits.test,
                   {n: build_attack(n, 0.1) for n in ["fgsm", "pgd20", "mifgsm20", "cw20"]}, torch.device("cpu"))
    assert acc["clean"] > 0.85, acc  # the model did learn
    assert acc["pgd20"] <= acc["fgsm"], acc
    assert acc["pgd20"] < acc["clean"] - 0.3, acc  # a natural model is not robust
    for name in ["mifgsm20", "cw20"]:
        assert acc[name] < acc["clean"] - 0.3, acc


def test_our_pgd_agrees_with_torchattacks(trained_digits_model, digits_splits):
    """An implementation independent of this project finds the same robust accuracy."""
    torch.manual_seed(0)
    acc = evaluate(trained_digits_model, digits_splits.test,
                   {n: build_attack(n, 0.05) for n in ["pgd20", "tapgd20"]}, torch.device("cpu"))
    assert abs(acc["pgd20"] - acc["tapgd20"]) <= 0.03, acc


def test_restarts_never_weaken_pgd(trained_digits_model, digits_splits):
    x, y = next(iter(digits_splits.test))
    torch.manual_seed(0)
    one = (trained_digits_model(pgd(trained_digits_model, x, y, 0.05, alpha=0.0125,
                                    steps=5)).argmax(1) == y).float().mean()
    torch.manual_seed(0)  # the first restart is the same draw
    three = (trained_digits_model(pgd(trained_digits_model, x, y, 0.05, alpha=0.0125, steps=5,
                                      restarts=3)).argmax(1) == y).float().mean()
    assert three <= one


@pytest.mark.parametrize("name", ["pgd", "pgd0", "foo20", "mifgsm20x3", "pgd20x", "square0", "raysx", "hmc0", "hmcx"])
def test_bad_attack_names_are_rejected(name):
    with pytest.raises(ValueError, match="attack"):
        build_attack(name, 0.1)
