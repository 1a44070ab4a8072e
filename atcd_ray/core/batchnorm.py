"""Re-running some rows of a minibatch through a BatchNorm network as if the whole minibatch ran.

In training mode BatchNorm normalises every row by the statistics of its whole minibatch, so a
forward of a few rows alone would normalise them by the few rows' own statistics. ATCD's
Metropolis-Hastings correction (docs/ALGORITHM_NOTES.md) re-runs only the rows it rejected;
``BatchStatistics`` records, during the training forward, the minibatch statistics of every
BatchNorm layer, and then runs any rows normalised by them. A re-run row is normalised as it
would have been inside the recorded minibatch, and its loss reaches the other rows through the
statistics, as in a training-mode BatchNorm; the running statistics are not updated again.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


# Autograd nodes of BatchNorm kernels whose saved results 1 and 2 are the minibatch's mean and
# inverse standard deviation, computed by the kernel itself: reading them costs nothing.
_SAVES_MEAN_INVSTD = {"NativeBatchNormBackward0", "CudnnBatchNormBackward0", "MiopenBatchNormBackward0"}


class _Moments(torch.autograd.Function):
    """A BatchNorm input's per-channel mean and biased variance, as its kernel computed them
    (forward: no work), differentiable with respect to that input (backward: one elementwise
    pass over it), so a loss on re-run rows reaches every row through the statistics."""

    @staticmethod
    def forward(ctx, x, mean, var):
        ctx.save_for_backward(x, mean)
        return mean.clone(), var.clone()

    @staticmethod
    def backward(ctx, grad_mean, grad_var):
        x, mean = ctx.saved_tensors
        shape = _channel_shape(x)
        count = x.numel() // x.shape[1]
        # d mean / dx = 1 / count, d var / dx = 2 (x - mean) / count: per channel, a + b * x
        slope = 2 * grad_var / count
        grad = torch.addcmul((grad_mean / count - slope * mean).view(shape), x, slope.view(shape).to(x.dtype))
        return grad.to(x.dtype), None, None


def _channel_shape(x: torch.Tensor) -> list[int]:
    return [1, x.shape[1]] + [1] * (x.ndim - 2)


class BatchStatistics:
    def __init__(self, model: nn.Module):
        self.layers = [m for m in model.modules() if isinstance(m, _BatchNorm)]
        self.moments: dict[nn.Module, tuple[torch.Tensor, torch.Tensor]] = {}
        self.mode = None  # "record" | "frozen" | None
        # Hooks registered once and switched by a flag, so that a compiled model sees the same
        # hooks on every call (registering per call would make torch.compile recompile).
        for layer in self.layers:
            layer.register_forward_hook(self._hook)

    def _hook(self, layer: nn.Module, args: tuple, output: torch.Tensor):
        if self.mode == "record" and layer.training:
            self.moments[layer] = self._moments(layer, args[0], output)
        elif self.mode == "frozen":  # replace the eval-mode output (running statistics) by this
            mean, var = self.moments[layer]
            shape = _channel_shape(args[0])
            out = (args[0] - mean.view(shape)) * torch.rsqrt(var.view(shape) + layer.eps)
            if layer.affine:
                out = out * layer.weight.view(shape) + layer.bias.view(shape)
            return out.to(output.dtype)
        return None

    @staticmethod
    def _moments(layer, x, output):
        node = output.grad_fn
        if type(node).__name__ in _SAVES_MEAN_INVSTD:
            mean, invstd = node._saved_result1, node._saved_result2
            return _Moments.apply(x, mean, invstd.float().pow(-2) - layer.eps)
        # Another kernel, or a compiled graph: a reduction over the input, differentiated by autograd.
        var, mean = torch.var_mean(x.float(), dim=[0, *range(2, x.ndim)], correction=0)
        return mean, var

    @contextlib.contextmanager
    def record(self):
        """Keep every BatchNorm layer's minibatch mean and (biased) variance, as functions of its
        input, during the training-mode forward inside."""
        self.moments.clear()
        self.mode = "record"
        try:
            yield
        finally:
            self.mode = None

    @contextlib.contextmanager
    def frozen(self):
        """Rows run inside are normalised by the recorded statistics, as the recorded
        minibatch's rows were, with the gradient through those statistics; no running statistic
        changes (the layers are in eval mode). The recorded statistics are released."""
        training = [layer.training for layer in self.layers]
        self.mode = "frozen"
        try:
            for layer in self.layers:
                layer.training = False
            yield
        finally:
            self.mode = None
            for layer, was_training in zip(self.layers, training):
                layer.training = was_training
            self.moments.clear()
