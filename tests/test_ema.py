"""Weight averaging (``train.ema``, issue 25): an EMA of the weights and BatchNorm statistics after
every optimiser step, kept in the checkpoints (a resume continues it bit for bit), validated beside
the raw weights, and the weights the run is tested on; a bad decay is one error line."""
import json

import pytest
import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

import atcd_ray
from atcd_ray import train, trainer
from atcd_ray.cli import run_main
from atcd_ray.config import load_config
from atcd_ray.core.checkpoint import Checkpoint
from atcd_ray.core.engine import EMA
from atcd_ray.core.methods import METHODS
from atcd_ray.validation import validate_checkpoint
from tests.test_bad_input import refused
from tests.test_mid_epoch import TIMING, CountedSteps

# Free-m: two optimiser steps a minibatch. 128 examples in batches of 32: 4 steps an epoch,
# a mid-epoch checkpoint after step 2; validation by PGD, whose random starts are drawn.
SMALL = {"train.method": "free", "train.epochs": 2, "data.subset": 128, "data.batch_size": 32, "eval.n": 32,
         "train.val_n": 32, "eval.attacks": ["fgsm"], "train.val_attack": "pgd3", "train.checkpoint_steps": 2,
         "train.ema": 0.9}


def small_config(**overrides):
    return load_config("digits", overrides=list({**SMALL, **overrides}.items()))


class BNNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 4, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(4)
        self.fc = torch.nn.Linear(4 * 4 * 4, 10)

    def forward(self, x):
        h = torch.nn.functional.adaptive_avg_pool2d(torch.relu(self.bn(self.conv(x))), 4)
        return self.fc(h.flatten(1))


def test_the_average_follows_every_optimiser_step_as_the_library_computes_it():
    torch.manual_seed(0)
    model, decay = BNNet(), 0.8
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    ema = EMA(model, decay)
    ema.follow(optimizer, model)
    library = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)
    trajectory = []  # the model's weights and buffers after each step

    def record(*_):
        library.update_parameters(model)
        trajectory.append({k: v.detach().clone() for k, v in model.state_dict().items()})

    optimizer.register_step_post_hook(record)
    method = METHODS["free"](model, optimizer, 0.1, METHODS["free"].Options(replays=2))
    for _ in range(3):
        method.step(torch.rand(8, 1, 12, 12), torch.randint(0, 10, (8,)))

    assert int(ema.n_averaged) == int(library.n_averaged) == len(trajectory) == 6  # per step, not per minibatch
    for key, value in library.state_dict().items():
        assert torch.equal(ema.state_dict()[key], value), key  # the same bits as AveragedModel's own update
    by_hand = dict(trajectory[0])
    for weights in trajectory[1:]:
        by_hand = {k: decay * by_hand[k] + (1 - decay) * w if w.is_floating_point() else by_hand[k]
                   for k, w in weights.items()}
    averaged = ema.module.state_dict()
    for key in ("conv.weight", "fc.bias", "bn.running_mean", "bn.running_var"):
        torch.testing.assert_close(averaged[key], by_hand[key])
        assert not torch.allclose(averaged[key], trajectory[-1][key])  # averaged, not a copy of the last
    assert all(not p.requires_grad for p in ema.module.parameters())


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    out = tmp_path_factory.mktemp("ema") / "straight"
    return out, trainer.fit(small_config(), out, progress=False)


def _records(out):
    return [{k: v for k, v in json.loads(line).items() if not any(t in k for t in TIMING)}
            for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_a_kill_inside_an_epoch_resumes_the_average_bit_for_bit(straight, tmp_path, monkeypatch):
    reference, summary = straight
    cfg, out = small_config(), tmp_path / "killed"
    steps = CountedSteps(monkeypatch, trainer.METHODS["free"])
    steps.kill_at = 4 + 3  # minibatch 3 of epoch 2: its last checkpoint is after minibatch 2
    with pytest.raises(KeyboardInterrupt):
        trainer.fit(cfg, out, progress=False)
    killed = Checkpoint(out / "last.safetensors")
    assert killed.meta["epoch_progress"]["steps"] == 2 and int(killed.ema_state()["n_averaged"]) == (4 + 2) * 2
    steps.kill_at = None
    resumed = trainer.fit(cfg, out, progress=False)

    a, b = Checkpoint(reference / "last.safetensors"), Checkpoint(out / "last.safetensors")
    assert set(a.tensors) == set(b.tensors) and any(k.startswith("ema.module.") for k in a.tensors)
    for key, tensor in a.tensors.items():
        assert torch.equal(tensor, b.tensors[key]), key  # weights, average, optimiser, Free's state, RNG
    assert int(b.ema_state()["n_averaged"]) == 2 * 4 * 2  # two epochs of four minibatches of two steps
    for key, tensor in Checkpoint(reference / "ema.safetensors").tensors.items():
        assert torch.equal(tensor, Checkpoint(out / "ema.safetensors").tensors[key]), key
    assert _records(reference) == _records(out)
    assert (resumed["clean_acc"], resumed["robust_acc"]) == (summary["clean_acc"], summary["robust_acc"])


def test_both_validations_are_recorded_and_the_average_is_what_is_tested(straight, tmp_path):
    out, summary = straight
    records = _records(out)
    assert [r["epoch"] for r in records] == [1, 2]
    for r in records:
        assert {"val_clean_acc", "val_robust_acc", "val_clean_acc_raw", "val_robust_acc_raw"} <= set(r)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    board = EventAccumulator(str(out / "tb")).Reload()
    for tag in ("val/robust_acc", "val/robust_acc_raw", "val/clean_acc", "val/clean_acc_raw"):
        assert [e.step for e in board.Scalars(tag)] == [1, 2], tag

    assert summary["ema"] == 0.9 and summary["checkpoint"] == "ema.safetensors"
    last, final = Checkpoint(out / "last.safetensors"), Checkpoint(out / "ema.safetensors")
    assert final.meta["ema"] == 0.9 and set(final.tensors) == {f"model.{k}" for k in last.model_state()}
    averaged, raw = last.averaged_model_state(), last.model_state()
    assert all(torch.equal(final.model_state()[k], averaged[k]) for k in raw)
    assert not all(torch.equal(averaged[k], raw[k]) for k in raw)  # positive control: not the raw weights
    model = atcd_ray.load_model(out / summary["checkpoint"])
    assert all(torch.equal(model.state_dict()[k], averaged[k]) for k in raw)

    # The validation apart from training (train.val_async's task) validates the average of the
    # checkpoint, from the seed the run's own validation of the average used, and keeps its weights.
    cfg = small_config(**{"train.select_best": "robust_val"})
    record = validate_checkpoint(cfg, out / "last.safetensors", tmp_path, torch.device("cpu"))
    assert record["val_robust_acc"] == pytest.approx(records[-1]["val_robust_acc"])
    assert record["val_clean_acc"] == pytest.approx(records[-1]["val_clean_acc"])
    assert "val_robust_acc_raw" in record
    best = Checkpoint(tmp_path / "best.safetensors")
    assert best.meta["ema"] == 0.9 and all(torch.equal(best.model_state()[k], averaged[k]) for k in raw)


def test_the_average_changes_nothing_of_the_training(straight, tmp_path):
    """The raw weights train, and are validated, as in a run without the average."""
    out, _ = straight
    trainer.fit(small_config(**{"train.ema": None}), tmp_path / "plain", progress=False)
    plain, averaged = Checkpoint(tmp_path / "plain" / "last.safetensors"), Checkpoint(out / "last.safetensors")
    for key, tensor in plain.tensors.items():
        assert torch.equal(tensor, averaged.tensors[key]), key
    with_ema, without = _records(out), _records(tmp_path / "plain")
    assert [r["val_robust_acc_raw"] for r in with_ema] == [r["val_robust_acc"] for r in without]
    assert [r["train_loss"] for r in with_ema] == [r["train_loss"] for r in without]


@pytest.mark.parametrize("value, message", [
    ("0", "train: ema must be a decay between 0 and 1 (exclusive), e.g. 0.999; got 0"),
    ("1", "got 1"), ("-0.5", "got -0.5"), ("1.5", "got 1.5"),
    ("x", "train.ema: expected float, got 'x'"), ("true", "train.ema: expected float, got True"),
])
def test_a_bad_decay_is_one_error_line_and_nothing_written(value, message, tmp_path, capsys):
    out = tmp_path / "run"
    line = refused(train.main, ["digits", "--workers", "0", "--set", f"train.ema={value}", "--out", str(out)], capsys)
    assert message in line, line
    assert not out.exists()
