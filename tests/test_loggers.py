"""dreambooth_pl.loggers: W&B online only with credentials, the git SHA asked once."""

from __future__ import annotations

import subprocess

import pytest

from dreambooth_pl import config, loggers

from .conftest import REPO


def test_wandb_logger_online_only_with_key(monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))  # no `wandb login` either
    assert loggers.AutoWandbLogger(save_dir=str(tmp_path))._offline is True
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert loggers.AutoWandbLogger(save_dir=str(tmp_path))._offline is False
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert loggers.AutoWandbLogger(save_dir=str(tmp_path))._offline is True


def test_git_sha_asks_git_once(monkeypatch):
    calls = []

    def fake_run(cmd, **kw):
        calls.append(cmd)
        out = "0123abcd\n" if cmd[1] == "rev-parse" else " M dreambooth_pl/cli.py\n"
        return subprocess.CompletedProcess(cmd, 0, stdout=out, stderr="")

    monkeypatch.setattr(loggers.subprocess, "run", fake_run)
    loggers.git_sha.cache_clear()
    try:
        assert loggers.git_sha() == "0123abcd-dirty"
        assert loggers.git_sha() == "0123abcd-dirty"
        assert calls == [["git", "rev-parse", "HEAD"], ["git", "status", "--porcelain", "--untracked-files=no"]]
    finally:
        loggers.git_sha.cache_clear()  # the next caller asks the real git


def test_wandb_login_netrc_counts_as_credentials(monkeypatch, tmp_path):
    # What `wandb login` writes: a netrc entry for the W&B host. No network is asked.
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_BASE_URL", raising=False)
    rc = tmp_path / "netrc"
    rc.write_text("machine api.wandb.ai\n  login user\n  password " + "k" * 40 + "\n")
    rc.chmod(0o600)
    monkeypatch.setenv("NETRC", str(rc))
    assert loggers.wandb_credentials() == str(rc) and loggers.wandb_online()
    assert loggers.AutoWandbLogger(save_dir=str(tmp_path))._offline is False
    monkeypatch.setenv("WANDB_BASE_URL", "https://wandb.example.org")  # a key for another host does not count
    assert loggers.wandb_credentials() is None and not loggers.wandb_online()
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert loggers.wandb_credentials() == "WANDB_API_KEY"
    monkeypatch.setenv("WANDB_MODE", "offline")  # the user's word wins
    assert not loggers.wandb_online()


@pytest.mark.integration
@pytest.mark.parametrize("logger", ["TensorBoard", "+=TensorBoard"])
def test_tensorboard_instead_of_or_beside_wandb_gets_scalars_config_and_grids(logger, photos, tmp_path, monkeypatch,
                                                                              tiny_dir):
    """`--trainer.logger TensorBoard` (instead of W&B) or `--trainer.logger+=TensorBoard` (beside it): the losses,
    validation and evaluation scores and the per-prompt grids in <run>/tensorboard; config.yaml and the CSV log the
    report reads stay in the run folder either way."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.chdir(REPO)
    prompts = tmp_path / "prompts"
    prompts.mkdir()
    (prompts / "prompts_object.txt").write_text("a {0} {1} in the snow\n")
    out = tmp_path / "out"
    flag = ["--trainer.logger+=TensorBoard"] if logger.startswith("+=") else ["--trainer.logger", logger]
    c = config.lightning_cli([
        "fit", "--config", "experiments/base.yaml", "--config", "experiments/tiny.yaml", *flag, "--data.subject", "toy",
        "--data.class_noun", "can", "--data.instance_dir", str(photos["instance"]), "--data.class_dir",
        str(photos["class"]), "--output_dir", str(out), "--trainer.max_steps", "2", "--trainer.val_check_interval", "2",
        "--trainer.log_every_n_steps", "1", "--trainer.enable_progress_bar", "false", "--eval.prompts_dir", str(prompts),
        "--eval.protocol.images_per_prompt", "1", "--eval.protocol.pres_images", "1", "--eval.protocol.steps", "2",
        "--export.enabled", "false"])
    kinds = [type(x).__name__ for x in c.trainer.loggers]
    assert kinds == (["TensorBoard", "CSVLogger"] if logger == "TensorBoard" else
                     ["AutoWandbLogger", "TensorBoard", "CSVLogger"])
    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    assert {"train/loss", "train/loss_prior", "val/loss_instance", "val/dino",
            "probe/denoising_mse_tuned"} <= scalars
    grids = [t for t in events.Tags()["images"] if t.startswith("grids/")]
    assert sorted(grids) == ["grids/base/a_sks_can_in_the_snow", "grids/final/a_sks_can_in_the_snow"]
    assert (out / "config.yaml").is_file() and "val/loss_instance" in (out / "csv" / "metrics.csv").read_text()
    assert config.parse_run_config(out).data.subject == "toy"
