"""ALGORITHM.md property 6 on real data (Fashion-MNIST, installed by .ci/run from Debian's
dataset-fashion-mnist): ATCD lifts PGD accuracy far above natural training, and a gradient-free
attack (torchattacks' Square, 1000 queries) does not do better than PGD, so the robustness is not
gradient masking; the same check flags a network that does mask gradients (positive control)."""
import pytest
import torch

import atcd_ray
from atcd_ray import trainer
from atcd_ray.config import RECIPES_DIR, load_config
from atcd_ray.data import build_splits

EVAL = [("eval.n", 500), ("train.val_n", 200), ("eval.attacks", ["pgd20"])]
# CompactCNN (the default recipe's network, ATCD at its study setting: 8 passes a minibatch): a
# third of SmallCNN's seconds for these runs and their attacks, with wider margins. Natural
# training gets more epochs than ATCD (it is 8x cheaper per image), so that it is well fit.
BUDGETS = {"natural": [("data.subset", 10000), ("train.epochs", 4)], "atcd": [("data.subset", 10000), ("train.epochs", 2)]}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("robustness")
    recipe = RECIPES_DIR / "fashion-mnist_compactcnn.yaml"  # the bounds below were measured on it
    return {m: (trainer.fit(load_config("fashion-mnist", recipe, [*EVAL, *budget, ("train.method", m)]), out / m,
                            progress=False), out / m) for m, budget in BUDGETS.items()}


def test_atcd_is_far_more_robust_than_natural_training(runs):
    natural, atcd = runs["natural"][0], runs["atcd"][0]
    assert natural["clean_acc"] > 0.75 and atcd["clean_acc"] > 0.65
    assert natural["robust_acc"]["pgd20"] < 0.25, natural["robust_acc"]  # measured 0.07 (seed 0)
    assert atcd["robust_acc"]["pgd20"] > natural["robust_acc"]["pgd20"] + 0.25, (natural, atcd)  # measured 0.67


# The masking check: PGD-20 against a 1000-query Square attack (score-based, gradient-free,
# torchattacks' implementation) on 100 test images. The positive control shows it fires.
MASKING_CHECK = ["pgd20", "square1000"]


class Quantised(torch.nn.Module):
    """Black-and-white input quantisation before a network: round() has zero gradient, so every
    gradient attack is blind (Athalye et al. 2018's textbook case of gradient masking)."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(torch.round(x))


def masking_check(model):
    from atcd_ray.core.attacks import build_attack
    from atcd_ray.core.engine import evaluate
    from atcd_ray.evaluate import masking_suspected

    test = build_splits("fashion-mnist", data_dir=None, batch_size=100, val_size=0, subset=None, eval_n=100,
                        val_n=None, seed=0).test
    torch.manual_seed(0)
    acc = evaluate(model, test, {name: build_attack(name, 0.1) for name in MASKING_CHECK}, torch.device("cpu"))
    return masking_suspected({k: v for k, v in acc.items() if k != "clean"}), acc


def test_the_masking_check_fires_on_a_model_that_masks_gradients(runs):
    summary, out = runs["natural"]
    net = atcd_ray.load_model(out / summary["checkpoint"])
    masked, acc = masking_check(Quantised(net).eval())
    assert masked and acc["square1000"] < acc["pgd20"] - 0.1, acc  # measured 0.73 PGD-20, 0.53 Square
    masked, acc = masking_check(net)
    assert not masked, acc  # the same network without the mask: PGD is the stronger attack


def test_gradient_free_attack_does_not_beat_pgd(runs):
    summary, out = runs["atcd"]
    masked, acc = masking_check(atcd_ray.load_model(out / summary["checkpoint"]))
    assert not masked and acc["square1000"] >= acc["pgd20"] - 0.03, acc


def test_autoattack_and_rays_on_the_atcd_model(runs):
    """AutoAttack (standard) is at most PGD-20: it is the stronger evaluation. RayS (hard-label) does
    not beat PGD-20 by more than a few points, so the evaluator's masking flag stays off. On 48 test
    images, since AutoAttack's FAB-T and 5000-query Square dominate a CPU test budget."""
    from atcd_ray.core.attacks import build_attack
    from atcd_ray.core.engine import evaluate
    from atcd_ray.evaluate import masking_suspected

    summary, out = runs["atcd"]
    model = atcd_ray.load_model(out / summary["checkpoint"])
    test = build_splits("fashion-mnist", data_dir=None, batch_size=48, val_size=0, subset=None, eval_n=48, val_n=None,
                        seed=0).test
    torch.manual_seed(0)
    acc = evaluate(model, test, {n: build_attack(n, 0.1) for n in ["pgd20", "autoattack", "rays1000", "hmc"]},
                   torch.device("cpu"))
    assert acc["autoattack"] <= acc["pgd20"], acc
    assert acc["rays1000"] >= acc["pgd20"] - 0.05, acc
    assert acc["hmc"] <= acc["clean"] - 0.1, acc  # "hmc": the default 20 proposals
    assert not masking_suspected({k: v for k, v in acc.items() if k != "clean"})
