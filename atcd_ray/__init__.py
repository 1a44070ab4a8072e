"""atcd_ray: Adversarial Training using Contrastive Divergence, and its baselines."""
from __future__ import annotations

__version__ = "0.1.0"


def load_model(checkpoint):
    """The network of a checkpoint, in eval mode: inputs in [0, 1], outputs logits. ``checkpoint``:
    a path, or a URI such as ``s3://bucket/run/best.safetensors`` (``atcd_ray.storage``)."""
    import tempfile

    from .config import config_from_dict
    from .core.checkpoint import Checkpoint, CheckpointError
    from .data import DATASETS
    from .storage import local_copy
    from .trainer import model_for

    with tempfile.TemporaryDirectory() as tmp:  # a remote file is copied here, read whole, dropped
        ckpt = Checkpoint(local_copy(checkpoint, tmp))
    cfg = config_from_dict(ckpt.config)
    model = model_for(cfg, DATASETS[cfg.dataset])
    try:
        model.load_state_dict(ckpt.model_state())
    except RuntimeError as err:  # weights of another network than its config names
        raise CheckpointError(f"{checkpoint}: its weights do not fit the {cfg.model} its config names "
                              f"({str(err).splitlines()[0]} ...)") from None
    return model.eval()


__all__ = ["load_model", "__version__"]
