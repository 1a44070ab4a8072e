"""atcd_ray: Adversarial Training using Contrastive Divergence, and its baselines."""
from __future__ import annotations

__version__ = "0.1.0"


def load_model(checkpoint):
    """The network of a checkpoint, in eval mode: inputs in [0, 1], outputs logits. ``checkpoint``:
    a path, or a URI such as ``s3://bucket/run/last.safetensors`` (``atcd_ray.storage``)."""
    import tempfile

    from .storage import local_copy, read_checkpoint

    with tempfile.TemporaryDirectory() as tmp:  # a remote file is copied here, read whole, dropped
        return model_of(read_checkpoint(local_copy(checkpoint, tmp), checkpoint), checkpoint)


def model_of(ckpt, name) -> "torch.nn.Module":  # noqa: F821 - torch is imported lazily
    """The network of a loaded ``Checkpoint``, in eval mode; ``name``: the file or URI, for errors."""
    from .config import config_from_dict
    from .core.checkpoint import CheckpointError
    from .data import DATASETS
    from .factories import model_for

    cfg = config_from_dict(ckpt.config)
    model = model_for(cfg, DATASETS[cfg.dataset])
    try:
        model.load_state_dict(ckpt.model_state())
    except RuntimeError as err:  # weights of another network than its config names
        raise CheckpointError(f"{name}: its weights do not fit the {cfg.model} its config names "
                              f"({str(err).splitlines()[0]} ...)") from None
    return model.eval()


__all__ = ["load_model", "model_of", "__version__"]
