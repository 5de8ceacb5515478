# dreambooth_pl: `make help` lists the targets.
SHELL := bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
SUBJECT ?= can
MODEL ?=
ARGS ?=
SHARED_DATA := $(abspath ../shared/data/dreambooth)
DATA_URL := https://github.com/google/dreambooth

# MODEL=tiny (or tiny-v, tiny-xl: SDXL layout, tiny-sd3, tiny-flux) layers the offline CPU config, MODEL=world the toy
# world's; neither touches the network. MODEL=sdxl / sd3 / flux layer experiments/<model>.yaml (SDXL base 1.0, SD3.5
# medium, FLUX.1-dev: 1024 px, LoRA); any other MODEL is a hub id, folder or file.
TINY_NAMES := tiny tiny-v tiny-xl tiny-sd3 tiny-flux
CONFIGS = --config experiments/base.yaml --config experiments/subjects/$(SUBJECT).yaml \
	$(if $(filter $(TINY_NAMES),$(MODEL)),--config experiments/tiny.yaml) \
	$(if $(filter world,$(MODEL)),--config experiments/world.yaml) \
	$(if $(filter sdxl,$(MODEL)),--config experiments/sdxl.yaml) \
	$(if $(filter sd3,$(MODEL)),--config experiments/sd3.yaml) \
	$(if $(filter flux,$(MODEL)),--config experiments/flux.yaml) \
	$(if $(filter-out sdxl sd3 flux,$(MODEL)),--model.pretrained $(MODEL))
OFFLINE = $(if $(filter $(TINY_NAMES) world,$(MODEL)),HF_HUB_OFFLINE=1)
# The demo's subject: yellow_heart is the one DreamBooth learns best in make world-claims (README, "What the toy
# world shows"); WORLD_SUBJECT=purple_star shows the hardest.
WORLD_SUBJECT ?= yellow_heart
# The tests run one intra-op thread per process (tests/conftest.py), so two pytest-xdist workers use both cores of a
# 2-core machine; --dist loadfile keeps each file's module fixtures (the world claims' fine-tunes) in one worker.
TEST_WORKERS ?= 2
PYTEST = $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile
# A toy-world subject (subject_type: world in its YAML) needs the world's photos (made offline), not the DreamBench download.
SUBJECT_DATA = $(if $(shell grep -s "subject_type: world" experiments/subjects/$(SUBJECT).yaml),world-data,data)

.PHONY: help install demo test test-unit test-slow lint data priors fit experiment dreambench compare compare-bench sweep tiny-model world world-data world-claims world-ablations clean

help: ## list the targets
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z_-]+:.*## / {printf "  \033[36m%-12s\033[0m %s\n", $$1, $$2}' $(MAKEFILE_LIST)

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -c constraints.txt -e '.[dev]'
	touch $@

install: $(VENV)/.installed ## create .venv and install the project (torch pinned by constraints.txt)

demo: install world-data ## offline demo on CPU: DreamBooth on a toy-world subject (WORLD_SUBJECT), report, InstructPix2Pix contrast
	$(MAKE) --no-print-directory experiment MODEL=world SUBJECT=$(WORLD_SUBJECT)
	HF_HUB_OFFLINE=1 $(PY) -m dreambooth_pl compare outputs/$(WORLD_SUBJECT) --model world-ip2p --steps 25 --guidance 5 --image-guidance 5

test: install ## run the test suite (unit + integration tests; no GPU, no network; < 10 min; TEST_WORKERS=2 processes)
	$(PYTEST)

test-unit: install ## run the unit tests alone (~1.5 min on 2 cores): no fit, no CLI run, no subprocess, no world claims
	$(PYTEST) -m "not slow and not gpu and not integration"

test-slow: install ## run the slow tests too (SD 1.5 / 2.1 / SDXL-size random components on CPU, ~20 GB RAM)
	$(PY) -m pytest -q -m "slow or not slow"

lint: install ## ruff
	$(VENV)/bin/ruff check dreambooth_pl tests benchmarks

data: ## get the DreamBooth dataset into data/dreambooth (links ../shared/data/dreambooth when present)
	@mkdir -p data
	@if [ -e data/dreambooth ]; then echo "data/dreambooth is present"; \
	elif [ -d "$(SHARED_DATA)" ]; then ln -s "$(SHARED_DATA)" data/dreambooth && echo "linked data/dreambooth -> $(SHARED_DATA)"; \
	else git clone --depth 1 $(DATA_URL) data/dreambooth && $(PY) -m dreambooth_pl dreambench-files data/dreambooth; fi

fit: install ## fine-tune SUBJECT (MODEL=tiny / tiny-xl offline on CPU, MODEL=sdxl for SDXL; ARGS=... for overrides)
	$(OFFLINE) $(PY) -m dreambooth_pl fit $(CONFIGS) $(ARGS)

priors: install ## make SUBJECT's class-prior images once (content-keyed cache/priors/; ARGS as for fit); fit reuses them
	$(OFFLINE) $(PY) -m dreambooth_pl priors $(CONFIGS) $(ARGS)

experiment: install $(SUBJECT_DATA) ## the whole study for SUBJECT in one command: priors -> fit (+ scores before/after, export) -> report
	$(OFFLINE) $(PY) -m dreambooth_pl experiment $(CONFIGS) $(ARGS)

SUBJECTS ?= can dog backpack
dreambench: install data ## experiment over SUBJECTS="a b c", then one mean ± 95% CI table (outputs/dreambench.md)
	@for s in $(SUBJECTS); do $(MAKE) --no-print-directory experiment SUBJECT=$$s MODEL=$(MODEL) ARGS='$(ARGS)' || exit 1; done
	$(PY) -m dreambooth_pl report $(addprefix outputs/,$(SUBJECTS)) --aggregate outputs/dreambench.md

# The offline models' own InstructPix2Pix; otherwise the command's default (timbrooks/instruct-pix2pix, or
# diffusers/sdxl-instructpix2pix-768 for an SDXL run).
IP2P_MODEL = $(if $(filter tiny tiny-v tiny-sd3 tiny-flux,$(MODEL)),--model tiny-ip2p,$(if $(filter tiny-xl,$(MODEL)),--model tiny-xl-ip2p,$(if $(filter world,$(MODEL)),--model world-ip2p,)))
IP2P_ARGS = $(if $(filter $(TINY_NAMES),$(MODEL)),--steps 20,$(if $(filter world,$(MODEL)),--steps 25 --guidance 5 --image-guidance 5,))
compare: install $(SUBJECT_DATA) ## DreamBooth vs InstructPix2Pix on SUBJECT (reuses outputs/SUBJECT; runs the experiment if absent)
	@[ -f outputs/$(SUBJECT)/metrics.json ] || $(MAKE) --no-print-directory experiment SUBJECT=$(SUBJECT) MODEL=$(MODEL) ARGS='$(ARGS)'
	$(OFFLINE) $(PY) -m dreambooth_pl compare outputs/$(SUBJECT) $(IP2P_MODEL) $(IP2P_ARGS)

compare-bench: install data ## compare over SUBJECTS="a b c", then one table per method (outputs/compare-bench.md)
	@for s in $(SUBJECTS); do $(MAKE) --no-print-directory compare SUBJECT=$$s MODEL=$(MODEL) ARGS='$(ARGS)' || exit 1; done
	$(PY) -m dreambooth_pl compare $(addprefix outputs/,$(SUBJECTS)) --aggregate outputs/compare-bench.md

SWEEP ?= experiments/sweeps/can_lr_steps_lambda.yaml
sweep: install data ## create the W&B sweep in SWEEP (needs `wandb login`); then run the agent it prints
	$(VENV)/bin/wandb sweep $(SWEEP)

tiny-model: install ## write the tiny random model to cache/models/tiny
	$(PY) -m dreambooth_pl tiny-model cache/models/tiny

world-data: install ## write the toy world's subjects (photos, subjects.csv, prompts) into data/world
	$(PY) -m dreambooth_pl world-data --root data/world

world: install ## train the toy world's models from scratch into models/world (ARGS="--reuse vae judge" keeps unchanged stages)
	$(PY) -m dreambooth_pl world-build --out models/world $(ARGS)

world-claims: install world-data ## measure DreamBooth's claims in the toy world against its judge -> outputs/world/claims.md
	HF_HUB_OFFLINE=1 $(PY) -m dreambooth_pl world-claims --out outputs/world

world-ablations: install world-data ## the ablations as curves on the validation subjects (CPU, < 60 min) -> outputs/world/ablations.md
	HF_HUB_OFFLINE=1 $(PY) -m dreambooth_pl world-ablations --out outputs/world

clean: ## remove outputs/, lightning_logs/ and wandb/ (keeps .venv, data and cache)
	rm -rf outputs lightning_logs wandb
