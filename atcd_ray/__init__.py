"""atcd_ray: Adversarial Training using Contrastive Divergence, and its baselines."""
from __future__ import annotations

__version__ = "0.1.0"


def load_model(checkpoint):
    """The network of a checkpoint, in eval mode: inputs in [0, 1], outputs logits."""
    from .config import config_from_dict
    from .core.checkpoint import Checkpoint, CheckpointError
    from .data import DATASETS
    from .trainer import model_for

    ckpt = Checkpoint(checkpoint)
    cfg = config_from_dict(ckpt.config)
    model = model_for(cfg, DATASETS[cfg.dataset])
    try:
        model.load_state_dict(ckpt.model_state())
    except RuntimeError as err:  # weights of another network than its config names
        raise CheckpointError(f"{checkpoint}: its weights do not fit the {cfg.model} its config names "
                              f"({str(err).splitlines()[0]} ...)") from None
    return model.eval()


__all__ = ["load_model", "__version__"]
