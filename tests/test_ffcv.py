"""FFCV pipelines: .beton writers and loaders, and the ImageNet path end to end on a generated
ImageFolder of JPEGs, with and without FFCV; a failing loader thread, a corrupt file and a
missing FFCV are errors (never a hang or a silent fallback). FFCV is installed by
scripts/setup.sh: these tests run in CI, never skipped."""
import json
import subprocess
import sys

import pytest
import torch

from atcd_ray.data import DATASETS, DataError, build_splits
from atcd_ray.data.ffcv_batches import FFCVBatches
from atcd_ray.write_ffcv import main as write_main
from tests.test_data import make_cifar10, make_image_folder


@pytest.mark.timeout(300)
def test_fashion_mnist_beton_gives_the_same_images_as_the_in_memory_loader(tmp_path):
    assert write_main(["fashion-mnist", "--split", "val", "--out", str(tmp_path / "val.beton")]) == 0
    spec = DATASETS["fashion-mnist"]
    ffcv_test = FFCVBatches(str(tmp_path / "val.beton"), "fashion-mnist", spec, 256, train=False, seed=0,
                            indices=list(range(512)), workers=1)
    memory_test = build_splits("fashion-mnist", data_dir=None, batch_size=256, val_size=5000, subset=None, eval_n=512,
                               val_n=10, seed=0).test
    assert len(ffcv_test) == len(memory_test) == 2 and ffcv_test.num_examples == 512
    for (x, y), (x_ref, y_ref) in zip(ffcv_test, memory_test):
        assert x.dtype == torch.float32 and x.shape == x_ref.shape == (256, 1, 28, 28)
        torch.testing.assert_close(x, x_ref, rtol=0, atol=0)
        assert torch.equal(y, y_ref)


@pytest.mark.timeout(300)
def test_cifar10_beton_test_split_is_exact_and_training_is_augmented(tmp_path, monkeypatch):
    make_cifar10(tmp_path, monkeypatch)
    for split in ["train", "val"]:
        assert write_main(["cifar10", "--data-dir", str(tmp_path), "--split", split, "--out",
                           str(tmp_path / f"{split}.beton")]) == 0
    memory = build_splits("cifar10", data_dir=str(tmp_path), batch_size=10, val_size=10, subset=None, eval_n=None,
                          val_n=None, seed=0)
    ffcv_splits = build_splits("cifar10", data_dir=str(tmp_path), batch_size=10, val_size=10, subset=None, eval_n=None,
                               val_n=None, seed=0, loader_workers=1, ffcv_dir=str(tmp_path))
    for (x, y), (x_ref, y_ref) in zip(ffcv_splits.test, memory.test):  # no augmentation: the same pixels
        torch.testing.assert_close(x, x_ref, rtol=0, atol=0)
        assert torch.equal(y, y_ref)
    assert ffcv_splits.train.num_examples == memory.train.num_examples == 90
    seen = torch.cat([y for _, y in ffcv_splits.train])
    assert sorted(seen.tolist()) == sorted(memory.train.labels.tolist())  # every training example once
    x, _ = next(iter(ffcv_splits.train))
    assert x.shape == (10, 3, 32, 32) and 0 <= x.min() and x.max() <= 1
    # Random crop (padding 4, zero fill) and flip: some training image differs from every stored one.
    stored = memory.train.images.float() / 255
    assert any(not any(torch.equal(image, s) for s in stored) for image in x)


@pytest.mark.timeout(600)
def test_imagenet_folder_written_loaded_and_trained_with_and_without_ffcv(tmp_path):
    tree, betons = tmp_path / "tree", tmp_path / "betons"
    make_image_folder(tree, classes=3, per_class=6, size=72)
    for split in ["train", "val"]:
        assert write_main(["imagenet", "--data-dir", str(tree), "--split", split, "--out",
                           str(betons / f"{split}.beton"), "--max-resolution", "64", "--jpeg-quality", "90"]) == 0
    spec = DATASETS["imagenet"]
    train = FFCVBatches(str(betons / "train.beton"), "imagenet", spec, 4, train=True, seed=0, indices=None, workers=1)
    train.set_epoch(2)
    first = [y.tolist() for _, y in train]
    train.set_epoch(2)
    assert [y.tolist() for _, y in train] == first  # the order is a function of (seed, epoch)
    x, y = next(iter(train))
    assert x.shape == (4, 3, 224, 224) and 0 <= x.min() and x.max() <= 1 and y.max() < 3
    val = FFCVBatches(str(betons / "val.beton"), "imagenet", spec, 4, train=False, seed=0, indices=None, workers=1)
    assert val.num_examples == 18 and sum(len(y) for _, y in val) == 18

    for extra in ([], ["--set", f"data.ffcv_dir={betons}"]):
        out = tmp_path / ("ffcv" if extra else "torchvision")
        proc = subprocess.run(
            [sys.executable, "-m", "atcd_ray.train", "imagenet", "--data-dir", str(tree), "--workers", "0",
             "--method", "atcd", "--epochs", "1", "--subset", "4", "--eval-n", "3", "--out", str(out), "--quiet",
             "--set", "data.batch_size=4", "--set", "data.val_size=3", "--set", "train.val_n=2",
             "--set", "data.loader_workers=1", "--set", "eval.attacks=[fgsm]", "--set", "train.val_attack=fgsm",
             *extra], capture_output=True, text=True, timeout=500)
        assert proc.returncode == 0, proc.stderr[-3000:]
        summary = json.loads((out / "summary.json").read_text())
        assert summary["epochs"] == 1 and summary["eval_n"] == 3 and summary["model"] == "resnet50"
        assert json.loads((out / "metrics.jsonl").read_text())["train_loss"] > 0


def test_writer_rejects_a_dataset_without_a_writer(capsys):
    from atcd_ray.cli import run_main

    assert run_main(write_main, ["digits", "--split", "train", "--out", "x.beton"]) == 2
    assert "no FFCV writer" in capsys.readouterr().err


@pytest.fixture
def cifar_beton(tmp_path, monkeypatch):
    make_cifar10(tmp_path, monkeypatch)
    assert write_main(["cifar10", "--data-dir", str(tmp_path), "--split", "val", "--out", str(tmp_path / "val.beton")]) == 0
    return tmp_path / "val.beton"


@pytest.mark.timeout(120)
def test_an_exception_in_the_loader_thread_is_an_error_not_a_hang(cifar_beton, monkeypatch):
    import threading

    from ffcv.loader import Loader, OrderOption
    from ffcv.loader.epoch_iterator import EpochIterator

    real = EpochIterator.run_pipeline

    def fail_on_batch_2(self, b_ix, *args):
        if b_ix == 1:
            raise OSError("disk read failed")
        return real(self, b_ix, *args)

    monkeypatch.setattr(EpochIterator, "run_pipeline", fail_on_batch_2)
    batches = FFCVBatches(str(cifar_beton), "cifar10", DATASETS["cifar10"], 4, train=False, seed=0, indices=None,
                          workers=1)
    with pytest.raises(DataError, match=rf"{cifar_beton}: FFCV loader failed \(OSError: disk read failed\)"):
        list(batches)
    # Positive control: FFCV's own Loader waits for ever on the same failure.
    plain = Loader(str(cifar_beton), batch_size=4, num_workers=1, order=OrderOption.SEQUENTIAL)
    consumer = threading.Thread(target=lambda: list(plain), daemon=True)
    consumer.start()
    consumer.join(timeout=10)
    assert consumer.is_alive()


def test_a_corrupt_beton_is_one_error_naming_the_file(cifar_beton, tmp_path):
    whole = cifar_beton.read_bytes()
    for name, content, message in [
        # Cut in the middle, FFCV's reader fails on the tables; cut at the end, it reads them short.
        ("truncated.beton", whole[:len(whole) // 2], r"not a readable FFCV .beton file \(ValueError"),
        ("cut-tail.beton", whole[:-8], "truncated or corrupt FFCV .beton file"),
        ("text.beton", b"not a beton file\n" * 100, "not a readable FFCV .beton file"),
    ]:
        path = tmp_path / name
        path.write_bytes(content)
        with pytest.raises(DataError, match=f"^{path}: {message}") as err:
            FFCVBatches(str(path), "cifar10", DATASETS["cifar10"], 4, train=False, seed=0, indices=None, workers=1)
        assert "\n" not in str(err.value)
    FFCVBatches(str(cifar_beton), "cifar10", DATASETS["cifar10"], 4, train=False, seed=0, indices=None, workers=1)  # the whole file opens


def test_ffcv_dir_without_ffcv_is_an_error(tmp_path, monkeypatch):
    for name in [m for m in sys.modules if m == "ffcv" or m.startswith("ffcv.")]:
        monkeypatch.setitem(sys.modules, name, None)  # as if FFCV were not installed
    monkeypatch.delitem(sys.modules, "atcd_ray.data.ffcv_batches")
    with pytest.raises(DataError, match="data.ffcv_dir is set but FFCV is not importable"):
        build_splits("digits", data_dir=None, batch_size=64, val_size=197, subset=None, eval_n=None, val_n=None,
                     seed=0, ffcv_dir=str(tmp_path))
