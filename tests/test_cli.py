"""dreambooth_pl.cli: the program's commands and help, unknown commands, a fit through main without warnings."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from dreambooth_pl import cli, components
from dreambooth_pl.commands import COMMANDS as IMPLEMENTED
from dreambooth_pl.data import DataError
from dreambooth_pl.experiment import COMMANDS as WITH_FIT_ARGS

from .conftest import REPO

COMMANDS = ("fit", "validate", "test", "predict", "experiment", "priors", "evaluate", "report", "compare", "export",
            "tiny-model", "dreambench-files", "world-data", "world-build", "world-claims", "world-ablations")
GROUPS = ("--model.", "--data.", "--eval.", "--export.", "--probe.")
PACKAGE = Path(cli.__file__).resolve().parent  # dreambooth_pl/, wherever it is imported from


@pytest.mark.integration
def test_program_help_lists_every_command():
    r = subprocess.run([sys.executable, "-m", "dreambooth_pl", "--help"], cwd=REPO, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("usage: python -m dreambooth_pl")
    listed = re.findall(r"^ {4}(\S+)", r.stdout, flags=re.M)  # the command column under <command>
    assert listed == list(COMMANDS)


def help_entries(text: str) -> dict[str, str]:
    """argparse help -> {option: help text}, one entry per `  --option [METAVAR][, --alias ...]  help...` block."""
    entries: dict[str, str] = {}
    for block in re.split(r"\n(?=  -)", text):
        m = re.match(r"  (--[\w.+-]+(?: [^\s,]+)?(?:, --[\w.+-]+(?: [^\s,]+)?)*)(.*)", block, flags=re.S)
        if m:
            body = m.group(2).split("\n\n")[0]  # a blank line ends the entry (a group title follows)
            entries[m.group(1).split()[0].rstrip(",")] = " ".join(body.split())
    return entries


def test_fit_help_describes_every_config_option(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "100")
    with pytest.raises(SystemExit) as e:
        cli.main(["fit", "--help"])
    assert e.value.code == 0
    entries = help_entries(capsys.readouterr().out)
    ours = {k: v for k, v in entries.items() if k.startswith(GROUPS)}
    for key in ("--model.optim.learning_rate", "--model.lora.rank", "--model.speed.cache_latents", "--data.prior.seed",
                "--eval.protocol.steps", "--export.single_file", "--probe.max_images", "--data.subject"):
        assert key in ours, key
    assert ours["--model.optim.learning_rate"].startswith("peak learning rate")
    undescribed = sorted(k for k, v in ours.items() if not re.sub(r"\(type: .*\)$", "", v).strip())
    assert undescribed == []


def test_unknown_command_exits_naming_the_choices(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["trian"])
    assert e.value.code == 2  # argparse's usage error
    err = capsys.readouterr().err
    assert "'trian'" in err and all(f"'{c}'" in err for c in COMMANDS)


@pytest.mark.integration
def test_fit_through_main_warns_nothing_of_its_own(photos, tmp_path, monkeypatch, tiny_dir):
    monkeypatch.chdir(REPO)
    out = tmp_path / "out"
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        cli.main(["fit", "--config", "experiments/base.yaml", "--config", "experiments/tiny.yaml",
                  "--data.subject", "toy", "--data.class_noun", "can",
                  "--data.instance_dir", str(photos["instance"]), "--data.class_dir", str(photos["class"]),
                  "--output_dir", str(out), "--trainer.enable_progress_bar", "false", "--trainer.max_steps", "2",
                  "--eval.every_n_steps", "0", "--eval.evaluate_base", "false", "--eval.final", "false"])
    assert (out / "model" / "model_index.json").is_file() and (out / "run.json").is_file()
    assert [str(w.message) for w in seen if "LightningCLI's args parameter" in str(w.message)] == []
    assert [f"{w.filename}:{w.lineno}: {w.message}" for w in seen if Path(w.filename).resolve().is_relative_to(PACKAGE)] == []


@pytest.mark.integration
@pytest.mark.parametrize("command", ["fit", "experiment", "priors"])
def test_missing_photos_end_in_one_message_before_any_model_loads(command, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    monkeypatch.setattr(components, "load_components", lambda *a, **k: pytest.fail("a model was loaded"))
    empty = tmp_path / "photos"
    empty.mkdir()
    args = [command, "--config", "experiments/base.yaml", "--config", "experiments/subjects/can.yaml"]
    override = ["--data.instance_dir", str(empty)]
    with pytest.raises(SystemExit) as e:
        cli.main(args + override)
    assert e.value.code == 1
    err = capsys.readouterr().err
    assert f"instance folder {empty} holds no images" in err and "Traceback" not in err and "--debug" in err
    with pytest.raises(DataError):  # --debug: the exception itself, with its traceback
        cli.main(args + override + ["--debug"])


@pytest.mark.integration
def test_program_help_imports_nothing_heavy():
    code = ("import sys, contextlib, io\nfrom dreambooth_pl import cli\n"
            "with contextlib.suppress(SystemExit), contextlib.redirect_stdout(io.StringIO()):\n    cli.main(['--help'])\n"
            "print(sorted(m for m in ('torch', 'pytorch_lightning', 'diffusers', 'transformers') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"  # so --help answers at once


def test_every_listed_command_is_implemented():
    assert list(cli.HELP) == [*cli.LIGHTNING_COMMANDS, *cli.CONFIG_COMMANDS, *IMPLEMENTED]
    assert tuple(WITH_FIT_ARGS) == cli.CONFIG_COMMANDS


@pytest.mark.integration
def test_make_experiment_without_photos_fails_fast_and_writes_nothing(fresh_cache):
    # `make experiment SUBJECT=water_bottle MODEL=tiny` runs exactly this command.
    cmd = [sys.executable, "-m", "dreambooth_pl", "experiment", "--config", "experiments/base.yaml", "--config",
           "experiments/subjects/water_bottle.yaml", "--config", "experiments/tiny.yaml", "--model.pretrained", "tiny"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}  # DREAMBOOTH_PL_CACHE: fresh_cache
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    if (REPO / "data" / "subjects" / "water_bottle").is_dir():
        pytest.skip("data/subjects/water_bottle exists in this checkout")
    assert r.returncode == 1
    assert r.stderr.startswith("error: instance folder data/subjects/water_bottle does not exist")
    assert "Traceback" not in r.stderr and not fresh_cache.exists()  # no class image was made


def test_an_optional_package_missing_is_said_before_any_class_image_is_made(fresh_cache, monkeypatch, capsys,
                                                                             photos):
    """The 12gb preset's 8-bit AdamW without bitsandbytes: one message with the install command, exit 1, no work."""
    try:
        import bitsandbytes  # noqa: F401

        pytest.skip("bitsandbytes installed")
    except ImportError:
        pass
    monkeypatch.chdir(REPO)
    monkeypatch.setattr(components, "load_components", lambda *a, **k: pytest.fail("a model was loaded"))
    with pytest.raises(SystemExit) as e:
        cli.main(["experiment", "--config", "experiments/base.yaml", "--config", "experiments/tiny.yaml", "--config",
                  "experiments/memory/12gb.yaml", "--data.instance_dir", str(photos["instance"])])
    err = capsys.readouterr().err
    assert e.value.code == 1 and err.startswith("error: model.optim.optimizer: adamw_8bit needs bitsandbytes")
    assert "pip install" in err and "Traceback" not in err and not fresh_cache.exists()
