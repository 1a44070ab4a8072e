"""Mid-epoch checkpoints (issue 13): with ``train.checkpoint_steps`` a run killed inside an epoch
resumes at the step after its last checkpoint, runs only the steps it had not run, and ends bit
for bit where an uninterrupted run ends; checkpointing itself changes nothing."""
import json

import pytest
import torch

from atcd_ray import trainer
from atcd_ray.core.checkpoint import Checkpoint
from atcd_ray.data.batches import TensorBatches
from tests.test_checkpoint import quick_config

TIMING = ("seconds", "per_second", "wait_fraction", "started_at", "finished_at")


def _state(out):
    metrics = [{k: v for k, v in json.loads(line).items() if not any(t in k for t in TIMING)}
               for line in (out / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((out / "summary.json").read_text())
    return Checkpoint(out / "last.safetensors"), metrics, (summary["clean_acc"], summary["robust_acc"])


class CountedSteps:
    """Patches ``method_cls.step`` to count the steps run (``run``) and to raise KeyboardInterrupt,
    a simulated kill, when the count reaches ``kill_at`` (None: never)."""

    def __init__(self, monkeypatch, method_cls):
        self.run, self.kill_at = 0, None
        real_step = method_cls.step

        def step(method, x, y):
            self.run += 1
            if self.kill_at and self.run == self.kill_at:
                raise KeyboardInterrupt("simulated kill")
            return real_step(method, x, y)

        monkeypatch.setattr(method_cls, "step", step)


def _assert_same(a_dir, b_dir):
    (a, metrics_a, test_a), (b, metrics_b, test_b) = _state(a_dir), _state(b_dir)
    assert set(a.tensors) == set(b.tensors)
    for key, tensor in a.tensors.items():
        assert torch.equal(tensor, b.tensors[key]), key  # weights, optimiser, ATCD chain, RNG
    assert metrics_a == metrics_b and test_a == test_b


def test_a_kill_inside_an_epoch_resumes_at_the_next_step_bit_exact(tmp_path, monkeypatch, caplog):
    # SmallCNN: its dropout masks (one per ATCD replay) draw from the RNG the checkpoint carries
    cfg = quick_config(**{"train.checkpoint_steps": 3, "model": "smallcnn"})
    cfg.data.batch_size = 32  # 8 steps an epoch: checkpoints after steps 3 and 6
    trainer.fit(cfg, tmp_path / "straight", progress=False)
    plain = quick_config(model="smallcnn")
    plain.data.batch_size = 32
    trainer.fit(plain, tmp_path / "plain", progress=False)
    # Positive control of the comparison, and proof that checkpointing changes nothing.
    _assert_same(tmp_path / "straight", tmp_path / "plain")

    out, steps = tmp_path / "crashed", CountedSteps(monkeypatch, trainer.METHODS[cfg.train.method])
    steps.kill_at = 8 + 5  # step 5 of epoch 2: its last checkpoint is after step 3
    with pytest.raises(KeyboardInterrupt):
        trainer.fit(cfg, out, progress=False)
    progress = Checkpoint(out / "last.safetensors").meta["epoch_progress"]
    assert progress["steps"] == 3 and Checkpoint(out / "last.safetensors").meta["epoch"] == 1
    steps.run, steps.kill_at = 0, None
    with caplog.at_level("INFO", logger="atcd_ray"):
        trainer.fit(cfg, out, progress=False)
    assert any("after epoch 1, step 3 of epoch 2" in r.getMessage() for r in caplog.records)
    assert steps.run == (8 - 3) + 8  # the rest of epoch 2 and epoch 3: nothing repeated, nothing skipped
    _assert_same(tmp_path / "straight", out)
    assert "epoch_progress" not in Checkpoint(out / "last.safetensors").meta  # the last one is an epoch's end


def test_batches_from_a_start_batch_are_the_tail_of_the_epoch_with_the_same_augmentation():
    images = torch.randint(0, 256, (70, 3, 8, 8), dtype=torch.uint8)
    labels = torch.arange(70)
    batches = TensorBatches(images, labels, batch_size=16, shuffle=True, drop_last=True, seed=3, augment="crop_flip")
    batches.set_epoch(2)
    whole = list(batches)
    assert len(whole) == len(batches) == 4
    for start in range(5):
        batches.set_epoch(2, start_batch=start)
        tail = list(batches)
        assert len(tail) == 4 - start and len(batches) == 4  # len is the epoch's, for the schedule
        for (x, y), (x_whole, y_whole) in zip(tail, whole[start:]):
            assert torch.equal(y, y_whole) and torch.equal(x, x_whole)
    batches.set_epoch(3)
    assert not torch.equal(list(batches)[0][1], whole[0][1])  # positive control: another epoch differs


def test_fast_fgsm_rolls_back_to_the_last_epoch_after_a_mid_epoch_resume():
    """Its early stop restores the weights of the last epoch's end; a checkpoint inside an epoch
    carries them, so a resume from it does not take the half-trained weights for them."""
    from atcd_ray.core.methods import METHODS
    from atcd_ray.core.models import build_model

    torch.manual_seed(0)
    model = build_model("compactcnn", 10, 1)
    fast = METHODS["fast"](model, torch.optim.SGD(model.parameters(), lr=0.1), 0.1,
                           METHODS["fast"].Options(early_stop=True))
    epoch_end = {k: v.clone() for k, v in model.state_dict().items()}
    fast.best_state, fast.previous_robust_acc = epoch_end, 0.5
    x, y = torch.rand(8, 1, 28, 28), torch.randint(0, 10, (8,))
    fast.step(x, y)  # inside the next epoch: the weights move on
    state = fast.state_dict()
    resumed = METHODS["fast"](model, torch.optim.SGD(model.parameters(), lr=0.1), 0.1, fast.options)
    resumed.load_state_dict(state)
    assert resumed.previous_robust_acc == 0.5
    assert all(torch.equal(resumed.best_state[k], epoch_end[k]) for k in epoch_end)
    assert not all(torch.equal(model.state_dict()[k], epoch_end[k]) for k in epoch_end)  # positive control
