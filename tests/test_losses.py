"""ALGORITHM.md properties 2 and 5 at the level of the loss functions."""
import math

import pytest
import torch
import torch.nn.functional as F

from atcd_ray.core.losses import cd_objective, cw_margin, mh_log_accept


@pytest.mark.parametrize("lam,rho", [(2.0, 1.0), (1.0, 0.0), (0.5, 3.0), (1.0, 1.0)])
def test_cd_objective_logit_gradient(lam, rho):
    """Property 2: d J_cd / d logits = lam (p - y) - rho (p_prev - y), per example (Eq. 14)."""
    torch.manual_seed(0)
    logits = torch.randn(8, 5, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 5, (8,))
    p_prev = F.softmax(torch.randn(8, 5, dtype=torch.float64), dim=1)
    (grad,) = torch.autograd.grad(cd_objective(logits, y, p_prev, lam=lam, rho=rho).sum(), logits)
    onehot = F.one_hot(y, 5).double()
    p = F.softmax(logits.detach(), dim=1)
    torch.testing.assert_close(grad, lam * (p - onehot) - rho * (p_prev - onehot))


def test_cd_objective_eq14_form():
    """With lam = 2, rho = 1 the gradient is p - (y - (p - p_prev)): the amended label of Eq. 14."""
    torch.manual_seed(1)
    logits = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 1, 2, 1])
    p_prev = F.softmax(torch.randn(4, 3, dtype=torch.float64), dim=1)
    (grad,) = torch.autograd.grad(cd_objective(logits, y, p_prev, lam=2.0, rho=1.0).sum(), logits)
    p, onehot = F.softmax(logits.detach(), dim=1), F.one_hot(y, 3).double()
    torch.testing.assert_close(grad, p - (onehot - (p - p_prev)))


def test_cd_objective_without_previous_output_is_scaled_ce():
    logits, y = torch.randn(6, 4), torch.randint(0, 4, (6,))
    torch.testing.assert_close(cd_objective(logits, y, None, lam=2.0, rho=1.0), 2.0 * F.cross_entropy(logits, y,
                                                                                                      reduction="none"))


def test_cw_margin_sign():
    logits = torch.tensor([[3.0, 1.0, 0.0], [0.0, 2.0, 5.0]])
    torch.testing.assert_close(cw_margin(logits, torch.tensor([0, 1])), torch.tensor([-2.0, 3.0]))


def test_mh_acceptance_limits():
    """Property 5 for the acceptance probability itself."""
    h_old = torch.tensor([1.0, 1.0, 1.0, 5.0])
    h_new = torch.tensor([0.5, 1.0, 2.0, 100.0])
    assert torch.equal(mh_log_accept(h_old, h_new, math.inf), torch.zeros(4))
    assert torch.equal(mh_log_accept(h_old, h_new, 0.0).exp(), torch.tensor([1.0, 1.0, 0.0, 0.0]))
    torch.testing.assert_close(mh_log_accept(h_old, h_new, 1.0), torch.tensor([0.0, 0.0, -1.0, -95.0]))
    # A very large temperature is effectively always-accept, a very small one greedy.
    assert mh_log_accept(h_old, h_new, 1e9).exp().min() > 0.999
    assert torch.equal(mh_log_accept(h_old, h_new, 1e-9).exp() > 0.5, torch.tensor([True, True, False, False]))
