"""Checkpoints: safetensors, atomic, no pickle; load_model; bit-exact resume after a crash."""
import copy
import json
from pathlib import Path

import pytest
import torch

import atcd_ray
from atcd_ray import run_dir, trainer
from atcd_ray.config import ConfigError, load_config
from atcd_ray.core.checkpoint import Checkpoint, save_checkpoint
from atcd_ray.core.methods import ATCD
from atcd_ray.core.methods.atcd import ATCDOptions
from atcd_ray.core.models import build_model


def test_round_trip_without_pickle(tmp_path, monkeypatch):
    torch.manual_seed(0)
    model = build_model("smallcnn", 10, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    method = ATCD(model, opt, 0.1, ATCDOptions(T=2, K=1))
    x, y = torch.rand(8, 1, 28, 28), torch.randint(0, 10, (8,))
    method.step(x, y)
    path = save_checkpoint(tmp_path / "c.safetensors", model, config={"a": 1}, meta={"epoch": 3}, optimizer=opt,
                           method_state=method.state_dict(),
                           rng_state=torch.get_rng_state())
    assert [p.name for p in tmp_path.iterdir()] == ["c.safetensors"]  # no temporary file left behind

    def no_unpickling(*args, **kwargs):
        raise AssertionError("checkpoint loading must not unpickle")

    monkeypatch.setattr(torch, "load", no_unpickling)
    monkeypatch.setattr("pickle.loads", no_unpickling)
    ckpt = Checkpoint(path)
    assert ckpt.config == {"a": 1} and ckpt.meta == {"epoch": 3}
    for key, value in model.state_dict().items():
        assert torch.equal(ckpt.model_state()[key], value)
    opt2 = torch.optim.SGD(build_model("smallcnn", 10, 1).parameters(), lr=0.5)
    opt2.load_state_dict(ckpt.optimizer_state())
    assert opt2.param_groups[0]["lr"] == 0.1 and opt2.param_groups[0]["momentum"] == 0.9
    saved, loaded = opt.state_dict()["state"], opt2.state_dict()["state"]
    assert sorted(saved) == sorted(loaded) == list(range(14))  # 7 layers, weight and bias
    for i in saved:
        assert torch.equal(saved[i]["momentum_buffer"], loaded[i]["momentum_buffer"])
    assert torch.equal(ckpt.method_state()["delta"], method.delta)


def test_failed_write_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    model = build_model("smallcnn", 10, 1)
    path = save_checkpoint(tmp_path / "c.safetensors", model, config={"v": 1})
    import atcd_ray.core.checkpoint as module

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(module, "save_file", crash)
    with pytest.raises(OSError):
        save_checkpoint(path, model, config={"v": 2})
    assert Checkpoint(path).config == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["c.safetensors"]


def test_not_a_checkpoint(tmp_path):
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(1)}, str(tmp_path / "x.safetensors"))
    with pytest.raises(ValueError, match="not an atcd_ray checkpoint"):
        Checkpoint(tmp_path / "x.safetensors")


def quick_config(**overrides):
    base = {"train.epochs": 3, "data.subset": 256, "eval.n": 64, "train.val_n": 64, "eval.attacks": ["pgd5"],
            "train.val_attack": "pgd3"}
    return load_config("digits", overrides=list({**base, **overrides}.items()))


def crash_in_epoch_3(cfg, out, monkeypatch):
    """Train ``cfg`` into ``out`` until a simulated crash at the start of its third epoch."""
    real = trainer.train_epoch

    def crash(method, batches, **kwargs):
        if kwargs["epoch"] == 2:
            raise KeyboardInterrupt("simulated crash")
        return real(method, batches, **kwargs)

    monkeypatch.setattr(trainer, "train_epoch", crash)
    with pytest.raises(KeyboardInterrupt):
        trainer.fit(cfg, out, progress=False)
    monkeypatch.setattr(trainer, "train_epoch", real)


def test_resume_after_a_crash_is_bit_exact(tmp_path, monkeypatch):
    cfg = quick_config()
    straight = trainer.fit(cfg, tmp_path / "straight", progress=False)
    crash_in_epoch_3(cfg, tmp_path / "crashed", monkeypatch)
    assert Checkpoint(tmp_path / "crashed" / "last.safetensors").meta["epoch"] == 2
    resumed = trainer.fit(cfg, tmp_path / "crashed", progress=False)

    lines = (tmp_path / "crashed" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2, 3]
    a = Checkpoint(tmp_path / "straight" / "last.safetensors").model_state()
    b = Checkpoint(tmp_path / "crashed" / "last.safetensors").model_state()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert resumed["clean_acc"] == straight["clean_acc"]


def test_resume_refuses_another_config(tmp_path):
    trainer.fit(quick_config(**{"train.epochs": 1}), tmp_path, progress=False)
    with pytest.raises(ConfigError, match=r"another config \(eps: 0.1 there, 0.2 here\)"):
        trainer.fit(quick_config(**{"train.epochs": 1, "eps": 0.2}), tmp_path, progress=False)


def test_resume_ignores_the_options_of_methods_not_trained():
    """Another method's options changed between start and resume (a default changed by an
    upgrade, say): the run resumes; a change to the trained method's own options is refused."""
    cfg = quick_config()
    started = json.loads(cfg.to_json())

    def changed(method):
        config = copy.deepcopy(started)
        name, value = next((k, v) for k, v in config["methods"][method].items() if isinstance(v, (int, float)))
        config["methods"][method][name] = value + 1
        return config, name

    other = next(m for m, options in started["methods"].items() if m != cfg.train.method and options)
    run_dir.check_same_config(Path("run/last.safetensors"), changed(other)[0], cfg)
    own, name = changed(cfg.train.method)
    with pytest.raises(ConfigError, match=rf"another config \(methods\.{cfg.train.method}\.{name}:"):
        run_dir.check_same_config(Path("run/last.safetensors"), own, cfg)


def test_load_model_gives_eval_mode_logits(tmp_path):
    # SmallCNN: it has dropout, which eval mode must switch off (the digits recipe's CompactCNN has none)
    summary = trainer.fit(quick_config(**{"train.epochs": 1, "model": "smallcnn"}), tmp_path, progress=False)
    model = atcd_ray.load_model(tmp_path / summary["checkpoint"])
    assert isinstance(model, torch.nn.Module) and not model.training
    x = torch.rand(5, 1, 28, 28)
    out = model(x)
    assert out.shape == (5, 10)
    assert torch.equal(out, model(x))  # eval mode: dropout off, deterministic
