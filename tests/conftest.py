import pytest
import torch

from atcd_ray.core.models import build_model
from atcd_ray.data import build_splits

torch.set_num_threads(2)


class TinyNet(torch.nn.Module):
    """A small conv net (with dropout) for fast property tests on generated data."""

    def __init__(self, channels: int = 1, classes: int = 10):
        super().__init__()
        self.conv = torch.nn.Conv2d(channels, 8, 3, padding=1)
        self.drop = torch.nn.Dropout(0.2)
        self.fc = torch.nn.Linear(8 * 4 * 4, classes)

    def forward(self, x):
        h = torch.nn.functional.adaptive_avg_pool2d(torch.relu(self.conv(x)), 4)
        return self.fc(self.drop(h.flatten(1)))


@pytest.fixture
def tiny_net():
    torch.manual_seed(0)
    return TinyNet()


@pytest.fixture
def random_batch():
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(16, 1, 12, 12, generator=gen)
    x[:, :, :3] = 0.0  # pixels on the box boundary exercise the [0, 1] projection
    x[:, :, -3:] = 1.0
    return x, torch.randint(0, 10, (16,), generator=gen)


@pytest.fixture(scope="session")
def digits_splits():
    return build_splits("digits", None, batch_size=64, val_size=197, subset=None, eval_n=None, val_n=None, seed=0)


@pytest.fixture(scope="session")
def trained_digits_model(digits_splits):
    """SmallCNN trained naturally on the scikit-learn digits for a few epochs (seconds)."""
    torch.manual_seed(0)
    model = build_model("smallcnn", 10, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for epoch in range(6):
        digits_splits.train.set_epoch(epoch)
        for x, y in digits_splits.train:
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    return model.eval()
