"""TensorBoard: a run's scalars per epoch and its hyperparameters with the final test."""
from __future__ import annotations

import json
from pathlib import Path

from .config import Config


class TensorBoard:
    """Rank 0's TensorBoard events under DIR/tb/, one step per epoch. A resumed run purges the
    steps after its checkpoint, so no step is written twice."""

    SCALARS = {"train_loss": "train/loss", "train_lr": "train/lr", "train_mh_accept_rate": "train/mh_accept_rate",
               "train_images_per_second": "train/images_per_second", "train_epoch_seconds": "train/epoch_seconds",
               "train_data_wait_fraction": "train/data_wait_fraction", "train_train_acc": "train/acc",
               "val_clean_acc": "val/clean_acc", "val_robust_acc": "val/robust_acc",
               # train.ema: val/* are the weight average's, val/*_raw the raw weights'
               "val_clean_acc_raw": "val/clean_acc_raw", "val_robust_acc_raw": "val/robust_acc_raw"}

    def __init__(self, log_dir: Path, cfg: Config, start_epoch: int):
        from torch.utils.tensorboard import SummaryWriter

        self.cfg = cfg
        self.writer = SummaryWriter(str(log_dir), purge_step=start_epoch + 1 if start_epoch else None)
        if not start_epoch:
            self.writer.add_text("config", "```\n" + json.dumps(cfg.to_dict(), indent=2) + "\n```", 0)

    def epoch(self, record: dict) -> None:
        for key, tag in self.SCALARS.items():
            if key in record:
                self.writer.add_scalar(tag, record[key], record["epoch"])
        self.writer.flush()

    def close(self, summary: dict) -> None:
        hparams = {"method": self.cfg.train.method, "eps": self.cfg.eps, "epochs": self.cfg.train.epochs,
                   "lr": self.cfg.optim.lr, "batch_size": self.cfg.data.batch_size, "seed": self.cfg.seed}
        if self.cfg.train.ema:
            hparams["ema"] = self.cfg.train.ema
        options = self.cfg.method_options
        hparams.update({f"{self.cfg.train.method}.{k}": v for k, v in vars(options).items()
                        if isinstance(v, (int, float, str, bool))})
        metrics = {"test/clean_acc": summary["clean_acc"],
                   **{f"test/{name}": acc for name, acc in summary["robust_acc"].items()}}
        self.writer.add_hparams(hparams, metrics, run_name=".")
        self.writer.close()
