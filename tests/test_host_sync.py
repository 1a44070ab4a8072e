"""No method's step waits for the GPU: statistics stay on the device, no data-dependent shapes.

On CUDA a host synchronisation (``.item()``, ``bool(tensor)``, boolean-mask indexing, ``nonzero``)
stalls the CPU until the GPU has caught up, so the GPU idles while the next kernels are queued.
``HostSyncDetector`` flags, on any device, the aten operations that synchronise on CUDA, so the
property is checked in CI without a GPU; where a GPU is present the same steps also run under
``torch.cuda.set_sync_debug_mode("error")``.
"""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from atcd_ray.core import hmc as hmc_module
from atcd_ray.core.methods import METHODS
from atcd_ray.core.methods.atcd import ATCDOptions
from atcd_ray.core.models import build_model

aten = torch.ops.aten
SYNCING = {aten._local_scalar_dense.default, aten.is_nonzero.default, aten.nonzero.default,
           aten.masked_select.default, aten.equal.default, aten._unique2.default,
           aten.unique_consecutive.default, aten.repeat_interleave.Tensor}
INDEXING = {aten.index.Tensor, aten.index_put.default, aten.index_put_.default, aten._index_put_impl_.default}


class HostSyncDetector(TorchDispatchMode):
    """Records every operation run inside that would make the host wait for a CUDA device."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        bool_index = func in INDEXING and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] or ()) if i is not None)
        if func in SYNCING or bool_index:
            self.calls.append(str(func))
        return func(*args, **(kwargs or {}))


def test_the_detector_fires_on_what_synchronises():
    """Positive control: each of these would stall a CUDA stream, and each is flagged."""
    t = torch.arange(6.0)
    for name, op in {"item": lambda: t.sum().item(), "bool": lambda: bool((t > 2).all()),
                     "mask": lambda: t[t > 2], "count": lambda: int((t > 2).sum())}.items():
        with HostSyncDetector() as detector:
            op()
        assert detector.calls, name
    with HostSyncDetector() as detector:
        torch.where(t > 2, t, -t).sum()
    assert detector.calls == []


STEP_CONFIGS = {  # name: (method, options); ATCD as on CUDA: a fixed number of re-run rows
    "natural": ("natural", None), "pgd": ("pgd", None), "free": ("free", None), "fast": ("fast", None),
    "nfgsm": ("nfgsm", None),
    "trades": ("trades", None), "yopo": ("yopo", None), "trades-yopo": ("trades-yopo", None),
    "atcd": ("atcd", ATCDOptions(T=2, K=2, mh_rerun="rows", rerun_capacity=0.25)),
    "atcd_reuse_exact": ("atcd", ATCDOptions(T=2, K=1, reuse_grad=True, cd_target="exact", mh_rerun="rows",
                                             rerun_capacity=0.25)),
    "atcd_batch": ("atcd", ATCDOptions(T=2, K=1, mh_rerun="batch")),
}


def _method(name, device, batchnorm=False, defaults=False):
    method, options = STEP_CONFIGS[name] if name in STEP_CONFIGS else (name, None)
    options = None if defaults and name != "atcd_batch" else options
    torch.manual_seed(0)
    net = build_model("preactresnet18" if batchnorm else "smallcnn", 10, 1)
    net = net.to(device)
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    return METHODS[method](net, opt, 0.1, options or METHODS[method].Options())


def _batches(device, size=28):
    gen = torch.Generator().manual_seed(0)
    return [(torch.rand(16, 1, size, size, generator=gen).to(device),
             torch.randint(0, 10, (16,), generator=gen).to(device)) for _ in range(3)]


@pytest.mark.parametrize("name", STEP_CONFIGS)
def test_no_method_step_synchronises(name):
    method = _method(name, "cpu")
    batches = _batches("cpu")
    method.step(*batches[0])  # the first step sets up per-method state
    with HostSyncDetector() as detector:
        for x, y in batches[1:]:
            stats = method.step(x, y)
    assert detector.calls == []
    assert all(isinstance(v, torch.Tensor) and v.dim() == 0 for v in stats.values())


def test_atcd_on_batchnorm_does_not_synchronise_with_a_fixed_capacity(monkeypatch):
    """PreActResNet18: the BatchNorm statistics of the re-run rows are read without a sync too;
    without a capacity (the CPU default) the count of rejected rows is read, and flagged."""
    reject_odd_rows = lambda h_old, h_new, tau: torch.where(torch.arange(len(h_old)) % 2 == 0, 0.0, -torch.inf)
    monkeypatch.setattr(hmc_module, "mh_log_accept", reject_odd_rows)
    batches = _batches("cpu", size=32)
    for capacity, expect_sync in [(0.25, False), (None, True)]:
        torch.manual_seed(0)
        net = build_model("preactresnet18", 10, 1)
        method = METHODS["atcd"](net, torch.optim.SGD(net.parameters(), lr=0.05), 0.1,
                                 ATCDOptions(T=2, K=1, rerun_capacity=capacity))
        method.step(*batches[0])
        with HostSyncDetector() as detector:
            stats = method.step(*batches[1])
        assert stats["mh_accept_rate"].item() == 0.5  # rows were rejected and re-run
        assert bool(detector.calls) == expect_sync, detector.calls


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (run on a lent GPU)")
@pytest.mark.parametrize("name", [*METHODS, "atcd_batch"])
@pytest.mark.parametrize("batchnorm", [False, True])
def test_no_method_step_synchronises_on_cuda(name, batchnorm):
    """Every method with its default options (ATCD re-runs a fixed number of rows on CUDA)."""
    method = _method(name, "cuda", batchnorm, defaults=True)
    batches = _batches("cuda", size=32 if batchnorm else 28)
    method.step(*batches[0])
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for x, y in batches[1:]:
            method.step(x, y)
    finally:
        torch.cuda.set_sync_debug_mode("default")
