import math

import pytest

from atcd_ray.core.schedules import learning_rate


def test_piecewise_steps_at_milestones():
    lrs = [learning_rate("piecewise", 0.2, e, 40, milestones=[30, 36]) for e in (0, 29.99, 30, 35.9, 36, 39)]
    assert lrs == pytest.approx([0.2, 0.2, 0.02, 0.02, 0.002, 0.002])


def test_cyclic_is_a_triangle():
    assert learning_rate("cyclic", 0.1, 0, 10, peak_fraction=0.4) == 0
    assert learning_rate("cyclic", 0.1, 4, 10, peak_fraction=0.4) == pytest.approx(0.1)
    assert learning_rate("cyclic", 0.1, 2, 10, peak_fraction=0.4) == pytest.approx(0.05)
    assert learning_rate("cyclic", 0.1, 7, 10, peak_fraction=0.4) == pytest.approx(0.05)
    assert learning_rate("cyclic", 0.1, 10, 10, peak_fraction=0.4) == 0


def test_cosine_and_constant():
    assert learning_rate("cosine", 0.1, 0, 10) == pytest.approx(0.1)
    assert learning_rate("cosine", 0.1, 5, 10) == pytest.approx(0.05)
    assert learning_rate("cosine", 0.1, 10, 10) == pytest.approx(0.0, abs=1e-12)
    assert learning_rate("constant", 0.1, 7, 10) == 0.1
    with pytest.raises(ValueError, match="unknown schedule"):
        learning_rate("exp", 0.1, 0, 1)


def test_optimisers(tmp_path):
    import torch

    from atcd_ray.config import load_config
    from atcd_ray.factories import build_optimizer

    model = torch.nn.Linear(2, 2)
    assert isinstance(build_optimizer(load_config("digits", overrides=[("optim.name", "adam")]), model), torch.optim.Adam)
    sgd = build_optimizer(load_config("digits"), model)
    assert isinstance(sgd, torch.optim.SGD) and sgd.param_groups[0]["momentum"] == 0.9
    assert not math.isnan(sgd.param_groups[0]["weight_decay"])
