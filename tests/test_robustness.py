"""ALGORITHM.md property 6 on real data (Fashion-MNIST, installed by .ci/run from Debian's
dataset-fashion-mnist): ATCD lifts PGD accuracy far above natural training, and a gradient-free
attack (torchattacks' Square) does not do much better than PGD, so the robustness is not
gradient masking."""
import pytest
import torch

import atcd_ray
from atcd_ray import trainer
from atcd_ray.config import load_config
from atcd_ray.data import build_splits

EVAL = [("eval.n", 500), ("train.val_n", 200), ("eval.attacks", ["pgd20"])]
# Natural training gets more data than ATCD (it is 4x cheaper per image), so that it is well fit.
BUDGETS = {"natural": [("data.subset", 10000), ("train.epochs", 4)], "atcd": [("data.subset", 6000), ("train.epochs", 2)]}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("robustness")
    return {m: (trainer.fit(load_config("fashion-mnist", overrides=[*EVAL, *budget, ("train.method", m)]), out / m,
                            progress=False), out / m) for m, budget in BUDGETS.items()}


def test_atcd_is_far_more_robust_than_natural_training(runs):
    natural, atcd = runs["natural"][0], runs["atcd"][0]
    assert natural["clean_acc"] > 0.75 and atcd["clean_acc"] > 0.65
    assert natural["robust_acc"]["pgd20"] < 0.25, natural["robust_acc"]  # measured 0.18 (seed 0)
    assert atcd["robust_acc"]["pgd20"] > natural["robust_acc"]["pgd20"] + 0.25, (natural, atcd)  # measured 0.55


def test_gradient_free_attack_does_not_beat_pgd(runs):
    import torchattacks

    summary, out = runs["atcd"]
    model = atcd_ray.load_model(out / summary["checkpoint"])
    x, y = next(iter(build_splits("fashion-mnist", None, 500, 0, None, 500, None, 0).test))
    x_adv = torchattacks.Square(model, eps=0.1, n_queries=300, seed=0)(x, y)
    assert (x_adv - x).abs().max() <= 0.1 + 1e-6 and 0 <= x_adv.min() and x_adv.max() <= 1
    with torch.no_grad():
        square_acc = (model(x_adv).argmax(1) == y).float().mean().item()
    assert square_acc >= summary["robust_acc"]["pgd20"] - 0.05, (square_acc, summary["robust_acc"])


def test_autoattack_and_rays_on_the_atcd_model(runs):
    """AutoAttack (standard) is at most PGD-20: it is the stronger evaluation. RayS (hard-label) does
    not beat PGD-20 by more than a few points, so the evaluator's masking flag stays off. On 48 test
    images, since AutoAttack's FAB-T and 5000-query Square dominate a CPU test budget."""
    from atcd_ray.core.attacks import build_attack
    from atcd_ray.core.engine import evaluate
    from atcd_ray.evaluate import masking_suspected

    summary, out = runs["atcd"]
    model = atcd_ray.load_model(out / summary["checkpoint"])
    test = build_splits("fashion-mnist", None, 48, 0, None, 48, None, 0).test
    torch.manual_seed(0)
    acc = evaluate(model, test, {n: build_attack(n, 0.1) for n in ["pgd20", "autoattack", "rays300", "hmc20"]},
                   torch.device("cpu"))
    assert acc["autoattack"] <= acc["pgd20"], acc
    assert acc["rays300"] >= acc["pgd20"] - 0.05, acc
    assert acc["hmc20"] <= acc["clean"] - 0.1, acc
    assert not masking_suspected({k: v for k, v in acc.items() if k != "clean"})
