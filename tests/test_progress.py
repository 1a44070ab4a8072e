"""What a user sees during an epoch, and what the engine reads from the device."""
import logging

import torch

from atcd_ray.core.engine import train_epoch
from atcd_ray.core.methods import METHODS
from atcd_ray.core.methods.atcd import ATCDOptions

from .conftest import TinyNet


class Batches(list):
    def set_epoch(self, epoch, start_batch=0):
        pass


def test_progress_lines_carry_step_loss_images_per_second_and_eta(caplog):
    torch.manual_seed(0)
    net = TinyNet()
    method = METHODS["atcd"](net, torch.optim.SGD(net.parameters(), lr=0.05), 0.1, ATCDOptions(T=2, K=1))
    gen = torch.Generator().manual_seed(0)
    batches = Batches((torch.rand(16, 1, 12, 12, generator=gen), torch.randint(0, 10, (16,), generator=gen))
                      for _ in range(4))
    with caplog.at_level(logging.INFO, logger="atcd_ray"):
        stats = train_epoch(method, batches, epoch=0, total_epochs=3, set_lr=lambda epoch: 0.05,
                            device=torch.device("cpu"), progress=True,
                            progress_interval=0.0, world_size=2)
    lines = [r.getMessage() for r in caplog.records if "ETA" in r.getMessage()]
    assert [line.split("  ")[1] for line in lines] == ["step 1/4", "step 2/4", "step 3/4"]  # none at the last step
    assert all(line.startswith("epoch 1/3") and "loss " in line and " images/s" in line for line in lines)
    assert isinstance(stats["loss"], float) and 0 < stats["mh_accept_rate"] <= 1 and stats["lr"] == 0.05

    caplog.clear()
    with caplog.at_level(logging.INFO, logger="atcd_ray"):
        train_epoch(method, batches, epoch=1, total_epochs=3, set_lr=lambda epoch: 0.05, device=torch.device("cpu"),
                    progress=False,
                    progress_interval=0.0)
    assert not [r for r in caplog.records if "ETA" in r.getMessage()]
