"""dreambooth_pl.loggers: W&B online only with credentials, the git SHA asked once."""

from __future__ import annotations

import subprocess

from dreambooth_pl import loggers


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
