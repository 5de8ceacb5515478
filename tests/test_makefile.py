"""The Makefile: every target documented, and the user's commands forward ARGS once to one command."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from .conftest import REPO

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="no make")


def dry_run(*args: str) -> list[str]:
    """The command lines `make -n` would run (nothing runs)."""
    r = subprocess.run(["make", "-n", "--no-print-directory", *args], cwd=REPO, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout.splitlines()


def project_commands(lines: list[str]) -> list[str]:
    """The `python -m dreambooth_pl <command>` lines, as `<command> <arguments>` (single spaces)."""
    return [" ".join(m.group(1).split()) for line in lines if (m := re.search(r"-m dreambooth_pl (\S.*)$", line))]


def test_every_target_has_a_help_line():
    text = (REPO / "Makefile").read_text()
    targets = set(re.findall(r"^([a-zA-Z_-]+):", text, flags=re.M))
    documented = set(re.findall(r"^([a-zA-Z_-]+):.*## \S", text, flags=re.M))
    assert targets and targets == documented
    phony = set(re.search(r"^\.PHONY: (.*)$", text, flags=re.M).group(1).split())
    assert targets <= phony


def test_the_suite_runs_in_two_workers_that_keep_a_files_fixtures_together_and_the_slow_tier_in_one():
    """The tests run one intra-op thread per process (conftest), so `make test` uses both cores with two workers; a
    file stays in one worker so its module fixtures (the world claims' fine-tunes) run once. The slow tier's
    real-size components need ~20 GB: one process."""
    for target in ("test", "test-unit"):
        (line,) = [c for c in dry_run(target) if "-m pytest" in c]
        assert "-n 2 --dist loadfile" in line, line
    (slow,) = [c for c in dry_run("test-slow") if "-m pytest" in c]
    assert " -n " not in slow, slow


def test_experiment_is_one_command_that_gets_the_overrides():
    """`make experiment ... ARGS=...`: one `experiment` call (priors -> fit -> report inside, one parse), so an override
    reaches the class images as well as the fit."""
    cmds = project_commands(dry_run("experiment", "SUBJECT=can", "MODEL=tiny", "ARGS=--data.num_class_images 3"))
    run = [c for c in cmds if not c.startswith("dreambench-files")]  # `make data`'s clone branch, not run here
    assert len(run) == 1 and run[0].startswith("experiment ")
    assert run[0].endswith("--model.pretrained tiny --data.num_class_images 3")
    assert "--config experiments/subjects/can.yaml --config experiments/tiny.yaml" in run[0]


@pytest.mark.parametrize("target", ["fit", "priors"])
def test_fit_and_priors_get_the_same_arguments(target):
    cmds = project_commands(dry_run(target, "SUBJECT=can", "MODEL=tiny-xl", "ARGS=--data.prior.steps 5"))
    assert cmds == [f"{target} --config experiments/base.yaml --config experiments/subjects/can.yaml --config "
                    f"experiments/tiny.yaml --model.pretrained tiny-xl --data.prior.steps 5"]


def test_demo_runs_the_experiment_command_on_the_world():
    cmds = [c for c in project_commands(dry_run("demo")) if c.split()[0] != "world-data"]
    assert cmds[0].startswith("experiment ") and "--config experiments/world.yaml" in cmds[0]
