"""Run provenance and the loggers: W&B (online with credentials, offline otherwise, never waiting on a network) and
TensorBoard, each with the evaluation's images."""

from __future__ import annotations

import functools
import netrc
import os
import re
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import wandb
from PIL import Image
from pytorch_lightning.loggers import TensorBoardLogger, WandbLogger


@functools.cache
def git_sha() -> str:
    """The checkout's commit (with `-dirty` when it has changes), or `unknown` outside git; asked once."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True,
                               timeout=5).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _netrc_path() -> Path:
    """Where `wandb login` keeps the key: $NETRC, else ~/.netrc (or ~/_netrc where only that exists)."""
    if os.environ.get("NETRC"):
        return Path(os.environ["NETRC"]).expanduser()
    unix = Path("~/.netrc").expanduser()
    return unix if unix.exists() or not Path("~/_netrc").expanduser().exists() else Path("~/_netrc").expanduser()


def wandb_credentials() -> str | None:
    """Where W&B would find an API key, as wandb resolves it: WANDB_API_KEY, then the netrc entry `wandb login`
    wrote for the W&B host ($WANDB_BASE_URL, default api.wandb.ai); None without one. The key is never returned."""
    if os.environ.get("WANDB_API_KEY"):
        return "WANDB_API_KEY"
    host = urlsplit(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).netloc
    path = _netrc_path()
    try:
        creds = netrc.netrc(path).authenticators(host)
    except (OSError, netrc.NetrcParseError):
        return None
    return str(path) if creds and creds[2] else None


def wandb_online() -> bool:
    """Online when wandb has credentials and WANDB_MODE is not offline/disabled; else offline, never waiting."""
    return wandb_credentials() is not None and os.environ.get("WANDB_MODE", "") not in ("offline", "disabled")


class AutoWandbLogger(WandbLogger):
    """WandbLogger that runs online with WANDB_API_KEY and offline otherwise (`offline=None`), saying which."""

    def __init__(self, save_dir: str = ".", name: str | None = None, project: str = "dreambooth_pl",
                 group: str | None = None, offline: bool | None = None, log_model: bool = False,
                 continue_run: bool = False, **kwargs):
        """W&B logger settings (`trainer.logger` init_args).

        Args:
            save_dir: folder of the W&B run (default: the run folder)
            name: run name (default: the subject)
            project: W&B project
            group: W&B group (default: the subject, so its DreamBooth and InstructPix2Pix runs sit together)
            offline: null = online when wandb has credentials (`wandb login`, netrc, WANDB_API_KEY) and WANDB_MODE is
                not offline, else offline (`wandb sync` uploads it later)
            log_model: upload checkpoints as W&B artifacts
            continue_run: continue the W&B run last written in save_dir (set by the CLI when a fit resumes from a
                checkpoint), so a resumed fit is one run with one history
        """
        offline = not wandb_online() if offline is None else offline
        Path(save_dir).mkdir(parents=True, exist_ok=True)
        where = (f"offline in {save_dir}/wandb (`wandb login` or WANDB_API_KEY to log online; `wandb sync` uploads it "
                 f"later)" if offline else f"online (credentials from {wandb_credentials()})")
        print(f"W&B: logging {where}", file=sys.stderr)
        previous = last_run_id(save_dir) if continue_run else None
        if previous:
            kwargs.update(id=previous, resume="allow")
        super().__init__(name=name, save_dir=save_dir, project=project, group=group, offline=offline,
                         log_model=log_model, **kwargs)
        # Lightning always passes `anonymous`, which wandb deprecates with a warning on every run.
        if self._wandb_init.get("anonymous") is None:
            self._wandb_init.pop("anonymous", None)


class TensorBoard(TensorBoardLogger):
    """TensorBoard with the run's defaults: scalars, the config and the evaluation's image grids in <run>/tensorboard
    (`tensorboard --logdir outputs`). `--trainer.logger TensorBoard` instead of W&B, `--trainer.logger+=TensorBoard`
    beside it."""

    def __init__(self, save_dir: str = ".", name: str = "", version: str = "tensorboard", log_graph: bool = False,
                 **kwargs):
        """TensorBoard logger settings (`trainer.logger` init_args).

        Args:
            save_dir: folder above the log (default: the run folder)
            name: subfolder of save_dir ("" = none)
            version: the log's folder under save_dir/name
            log_graph: also write the model graph
        """
        super().__init__(save_dir, name=name, version=version, log_graph=log_graph, default_hp_metric=False, **kwargs)

    def log_image(self, key: str, images: list[Image.Image], step: int | None = None,
                  caption: list[str] | None = None) -> None:
        """Images under `key/<caption>` (WandbLogger's signature, so the callbacks log to either)."""
        for i, img in enumerate(images):
            tag = re.sub(r"[^\w.-]+", "_", caption[i]) if caption else f"{i:02d}"
            self.experiment.add_image(f"{key}/{tag}", np.asarray(img.convert("RGB")), global_step=step,
                                      dataformats="HWC")  # (H, W, 3) uint8


def last_run_id(save_dir: str | Path) -> str | None:
    """The id of the W&B run last written under save_dir (wandb's `latest-run` link: run-<date>-<id>)."""
    latest = Path(save_dir) / "wandb" / "latest-run"
    return latest.resolve().name.rsplit("-", 1)[-1] if latest.exists() else None


def finish_wandb() -> None:
    """Close the W&B run, also after a failure, so its log is complete and the next run in this process is new."""
    if wandb.run is not None:
        wandb.finish()
