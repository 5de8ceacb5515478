"""Callbacks: SampleAndScore's tiny fit (samples, scores, logs, checkpoints on val/dino); RunRecord, ExportModel and
LearningProbe under a plain Trainer.fit."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import pytorch_lightning as pl
import torch
from PIL import Image
from pytorch_lightning.callbacks import Callback, LearningRateMonitor, ModelCheckpoint
from pytorch_lightning.loggers import CSVLogger, Logger
from safetensors import safe_open
from safetensors.torch import load_file

from dreambooth_pl.callbacks import ExportModel, LearningProbe, RunRecord, SampleAndScore
from dreambooth_pl.data import load_image
from dreambooth_pl.encoders import load_encoders
from dreambooth_pl.evaluation import Protocol, protocol_prompts, score
from dreambooth_pl.loggers import AutoWandbLogger, git_sha
from dreambooth_pl.module import DreamBoothModule, Optimization

from .conftest import make_datamodule, make_photos, make_trainer

TEMPLATES = "a {0} {1} in the jungle\na {0} {1} in the snow\na red {0} {1}\n"


@pytest.fixture
def prompts_dir(tmp_path) -> Path:
    d = tmp_path / "prompts"
    d.mkdir()
    (d / "prompts_object.txt").write_text(TEMPLATES)
    (d / "prompts_live.txt").write_text(TEMPLATES)
    return d


@pytest.mark.integration
def test_tiny_fit_samples_scores_logs_and_checkpoints_on_val_dino(tiny_dir, photos, prompts_dir, tmp_path, wandb_run):
    from dreambooth_pl.report import write_report

    out = tmp_path / "run"
    cb = SampleAndScore(protocol=Protocol(images_per_prompt=2, steps=3, pres_images=3), every_n_steps=2,
                        subset_prompts=2, encoders="tiny", prompts_dir=str(prompts_dir), batch_size=8)
    ckpt = ModelCheckpoint(dirpath=out / "ckpt", monitor="val/dino", mode="max", save_top_k=1, every_n_train_steps=2)
    dm = make_datamodule(photos, subject="toy")
    loggers = [CSVLogger(out, name="", version="csv"), AutoWandbLogger(save_dir=str(out), name="toy")]
    trainer = make_trainer(out, 5, [cb, ckpt], logger=loggers, log_every_n_steps=1, enable_checkpointing=True)
    trainer.fit(DreamBoothModule(pretrained="tiny", optim=Optimization(learning_rate=1e-3)), datamodule=dm)
    s = Protocol().seed  # the default: apart from the class images' seeds 0..199
    assert s == 10_000
    for stage in ("base", "final"):
        names = sorted(p.name for p in (out / "samples" / stage).iterdir())
        assert names == sorted([f"{i:02d}_{s + k}.png" for i in range(3) for k in range(2)] +
                               [f"class_{s + j}.png" for j in range(3)])
    assert sorted(p.name for p in (out / "samples" / "step000002").iterdir()) == [
        f"{i:02d}_{s + k}.png" for i in range(2) for k in range(2)]
    m = json.loads((out / "metrics.json").read_text())
    assert m["calibrated"] is False and all("uncalibrated" in n for n in m["encoders"].values())
    assert m["protocol"] == {"images_per_prompt": 2, "seed": s, "steps": 3, "guidance_scale": 7.5, "sampler": "dpm++",
                             "resolution": 64, "pres_images": 3}
    # Every stage's scores are those of its sample files, scored again here with the same tiny encoders.
    encoders = load_encoders("tiny")
    real = [load_image(p) for p in dm.instance_images]
    prompts = protocol_prompts(prompts_dir, "object", "sks", "can")
    for stage in ("base", "final"):
        folder = out / "samples" / stage
        groups = [(ep, [s, s + 1], [Image.open(folder / f"{ep.index:02d}_{x}.png").convert("RGB") for x in (s, s + 1)])
                  for ep in prompts]
        pres = [Image.open(folder / f"class_{s + j}.png").convert("RGB") for j in range(3)]
        expected = score(encoders, real, groups, pres)
        assert set(m["stages"][stage]["metrics"]) == {"dino", "clip_i", "clip_t", "clip_t_no_token", "pres", "div"}
        assert all(-1 <= v <= 1 for k, v in m["stages"][stage]["metrics"].items() if k != "div")
        assert m["stages"][stage]["metrics"] == pytest.approx(expected.metrics, abs=1e-6)
        got = m["stages"][stage]["per_prompt"]
        assert [(r["index"], r["prompt"]) for r in got] == [(r["index"], r["prompt"]) for r in expected.per_prompt]
        assert [{k: v for k, v in r.items() if k not in ("index", "prompt")} for r in got] == [
            pytest.approx({k: v for k, v in r.items() if k not in ("index", "prompt")}, abs=1e-6)
            for r in expected.per_prompt]
    assert m["stages"]["final"]["step"] == 5 and len(m["stages"]["final"]["per_prompt"]) == 3
    # val/dino was logged during training and drove the checkpoint choice.
    assert ckpt.best_model_score is not None and Path(ckpt.best_model_path).is_file()
    csv_text = (out / "csv" / "metrics.csv").read_text()
    assert "val/dino" in csv_text and "train/loss_prior" in csv_text
    # W&B (offline): the sample table, per-prompt grids, the class grid and val/* history.
    loggers[1].experiment.finish()
    (run_dir,) = (out / "wandb").glob("offline-run-*")
    media = run_dir / "files" / "media"
    assert list((media / "table" / "samples").glob("base*.table.json")) and list((media / "table" / "samples").glob("final*"))
    assert list((media / "images" / "grids").glob("*.png")) and list((media / "images" / "priors").glob("*.png"))
    history = wandb_run(run_dir)["history"]
    assert any("val/dino" in h for h in history) and any("val/clip_t_no_token" in h for h in history)
    # The final scores reached the loggers as val/* at the last step.
    final_dino = m["stages"]["final"]["metrics"]["dino"]
    assert any(h.get("val/dino") is not None and float(h["val/dino"]) == pytest.approx(final_dino, abs=1e-6)
               for h in history)
    # The local report from the same run.
    report = write_report(out).read_text()
    assert "Uncalibrated" in report and "Base model (before)" in report and "0.668" in report
    assert (out / "figures" / "loss.png").is_file() and (out / "figures" / "prompt_00.png").is_file()
    assert Image.open(out / "figures" / "prompt_00.png").size[1] > 2 * 100  # two rows: base and final


# ------------------------------------------------------------------------------ RunRecord, ExportModel, LearningProbe


class MemoryLogger(Logger):
    """Keeps every log_metrics call: [(step, {key: value})]."""

    def __init__(self):
        super().__init__()
        self.rows: list[tuple[int | None, dict]] = []

    @property
    def name(self) -> str:
        return "memory"

    @property
    def version(self) -> str:
        return "0"

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass

    def log_metrics(self, metrics, step=None) -> None:
        self.rows.append((step, {k: float(v) for k, v in metrics.items()}))

    def values(self, key: str) -> list[tuple[int | None, float]]:
        return [(step, row[key]) for step, row in self.rows if key in row]


class TrainParts(Callback):
    """The train/* values of every step (what the progress bar and loggers get)."""

    def __init__(self):
        self.logged: list[dict] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.logged.append({k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("train/")})


SEED, STEPS, LR, WARMUP = 1234, 60, 1e-3, 5


@pytest.fixture(scope="module")
def after_fit(tiny_dir, tmp_path_factory):
    """A 60-step prior-preservation fit with the after-fit callbacks, as the CLI adds them, under a plain Trainer."""
    root = tmp_path_factory.mktemp("after_fit")
    photos = {"instance": make_photos(root / "instance", 4, seed=1),
              "class": make_photos(root / "class", 6, seed=2, kind="noise")}
    pl.seed_everything(SEED)
    module = DreamBoothModule(pretrained="tiny", optim=Optimization(learning_rate=LR, lr_warmup_steps=WARMUP))
    dm = make_datamodule(photos)
    logger, parts, run = MemoryLogger(), TrainParts(), root / "run"
    callbacks = [parts, LearningRateMonitor(logging_interval="step"), RunRecord(), ExportModel(),
                 LearningProbe(enabled=True)]
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        make_trainer(run, STEPS, callbacks, logger=logger, log_every_n_steps=1).fit(module, datamodule=dm)
    return SimpleNamespace(module=module, dm=dm, run=run, logger=logger, logged=parts.logged, stdout=stdout.getvalue())


@pytest.mark.integration
def test_fit_logs_the_loss_parts_and_the_learning_rate(after_fit):
    logged = after_fit.logged
    assert len(logged) == STEPS
    assert {"train/loss", "train/loss_instance", "train/loss_prior"} <= set(logged[-1])
    assert all(r["train/loss_prior"] > 0 for r in logged)  # class rows are in every batch
    assert all(r["train/loss"] == pytest.approx(r["train/loss_instance"] + r["train/loss_prior"], rel=1e-6)
               for r in logged)  # prior_loss_weight 1
    # LearningRateMonitor logs train/lr (the scheduler's name): the linear warm-up, then the constant rate.
    lrs = dict(after_fit.logger.values("train/lr"))
    assert sorted(lrs) == list(range(STEPS))
    assert all(lr == pytest.approx(LR * min(1.0, step / WARMUP), rel=1e-9) for step, lr in lrs.items())  # diffusers


@pytest.mark.integration
def test_run_record_writes_run_json(after_fit):
    record = json.loads((after_fit.run / "run.json").read_text())
    assert set(record) == {"fit_seconds", "peak_gpu_memory_gb", "steps", "git_sha", "seed"}
    assert record["steps"] == STEPS and record["seed"] == SEED and record["git_sha"] == git_sha()
    assert record["peak_gpu_memory_gb"] is None and record["fit_seconds"] > 0  # CPU run


@pytest.mark.integration
def test_export_model_writes_the_pipeline_and_the_single_file(after_fit):
    from diffusers import StableDiffusionPipeline

    run, module = after_fit.run, after_fit.module
    assert sorted(p.name for p in run.iterdir()) == ["exported.json", "model", "run.json", "t.safetensors"]
    assert json.loads((run / "exported.json").read_text()) == {"step": STEPS, "weights": "last", "ema": False}
    pipe = StableDiffusionPipeline.from_pretrained(run / "model")
    unet = module.unet.state_dict()
    assert pipe.unet.state_dict().keys() == unet.keys()
    assert all(torch.equal(v, unet[k]) for k, v in pipe.unet.state_dict().items())
    meta = json.loads((run / "model" / "dreambooth_pl.json").read_text())
    assert meta == {"base_model": "tiny", "revision": None, **after_fit.dm.describe(), "resolution": 64, "steps": STEPS,
                    "seed": SEED, "git_sha": git_sha(), "exported": {"step": STEPS, "weights": "last", "ema": False}}
    card = (run / "model" / "README.md").read_text()  # the model card: Hub front matter, trigger phrase, settings
    assert card.startswith("---\nbase_model: tiny\n") and f"Trigger phrase: **`{after_fit.dm.instance_prompt}`**" in card
    with safe_open(run / "t.safetensors", "pt") as f:
        header = f.metadata()
    assert header["modelspec.sai_model_spec"] == "1.0.0" and header["modelspec.resolution"] == "64x64"
    assert header["modelspec.trigger_phrase"] == after_fit.dm.instance_prompt
    assert header["ss_max_train_steps"] == str(STEPS) and header["ss_sd_model_name"] == "tiny"
    single = load_file(run / "t.safetensors")
    assert torch.equal(single["model.diffusion_model.input_blocks.0.0.weight"], module.unet.conv_in.weight.half())
    assert f"Exported diffusers: {run / 'model'}" in after_fit.stdout
    assert f"Exported single file: {run / 't.safetensors'}" in after_fit.stdout


@pytest.mark.integration
def test_learning_probe_logs_base_and_tuned_denoising_mse(after_fit):
    (step, probe), = [(s, r) for s, r in after_fit.logger.rows if "probe/denoising_mse_base" in r]
    assert step == STEPS and set(probe) == {"probe/denoising_mse_base", "probe/denoising_mse_tuned"}
    # The probe's pixels: the center-cropped, unflipped instance photos (at most 8).
    pixels = torch.stack([v[0] for v in after_fit.dm.fixed_views("instance", limit=8)])
    prompts = [after_fit.dm.instance_prompt] * len(pixels)
    assert pixels.shape == (4, 3, 64, 64)
    base = DreamBoothModule(pretrained="tiny").denoising_mse(pixels, prompts)
    assert probe["probe/denoising_mse_base"] == base
    assert probe["probe/denoising_mse_tuned"] == after_fit.module.denoising_mse(pixels, prompts)
    assert probe["probe/denoising_mse_tuned"] <= 0.7 * base, probe  # the fit learnt the photos
    assert "Denoising MSE on the instance photos" in after_fit.stdout


class PeakAtStep(Callback):
    """Logs val/fake = 1 at optimizer step `peak`, 0 elsewhere: a monitored metric whose best step is known."""

    def __init__(self, peak: int):
        self.peak = peak

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        pl_module.log("val/fake", float(trainer.global_step == self.peak))


@pytest.mark.integration
def test_export_model_exports_the_best_checkpoint_and_every_n_steps(tiny_dir, photos, tmp_path):
    run = tmp_path / "run"
    best = ModelCheckpoint(dirpath=run / "checkpoints", monitor="val/fake", mode="max", save_top_k=1,
                           every_n_train_steps=1)
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        make_trainer(run, 6, [PeakAtStep(2), best, ExportModel(every_n_steps=3)], enable_checkpointing=True).fit(
            DreamBoothModule(pretrained="tiny", optim=Optimization(learning_rate=1e-3)), datamodule=make_datamodule(photos))
    assert sorted(p.name for p in (run / "exports").iterdir()) == ["step000003", "step000006"]
    record = json.loads((run / "exported.json").read_text())
    assert record["weights"] == "best" and record["step"] == 2 and record["monitor"] == "val/fake"
    ckpt = torch.load(record["checkpoint"], map_location="cpu", weights_only=True)
    exported = load_file(next((run / "model" / "unet").glob("*.safetensors")))
    assert all(torch.equal(exported[k.removeprefix("unet.")], v) for k, v in ckpt["state_dict"].items())
    late = load_file(next((run / "exports" / "step000006" / "model" / "unet").glob("*.safetensors")))
    assert not all(torch.equal(late[k], exported[k]) for k in exported)  # the best step is not the last
    assert "Exporting the best checkpoint: step 2, val/fake = 1.0000" in stdout.getvalue()


@pytest.mark.integration
def test_ema_weights_are_exported_and_checkpointed_and_the_trained_ones_kept(tiny_dir, photos, tmp_path):
    run = tmp_path / "run"
    saved = ModelCheckpoint(dirpath=run / "checkpoints", save_last=True, save_top_k=0, every_n_train_steps=4)
    module = DreamBoothModule(pretrained="tiny", optim=Optimization(learning_rate=1e-2, ema_decay=0.9))
    make_trainer(run, 4, [saved, ExportModel()], enable_checkpointing=True).fit(module, datamodule=make_datamodule(photos))
    trained = {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}
    shadow = dict(zip(trained, module.ema.shadow_params, strict=True))
    assert not all(torch.equal(shadow[n], v) for n, v in trained.items())  # the average lags the weights
    exported = load_file(next((run / "model" / "unet").glob("*.safetensors")))
    assert all(torch.equal(exported[n.removeprefix("unet.")], shadow[n]) for n in trained)  # the export is the EMA
    assert all(torch.equal(p, trained[n]) for n, p in module.named_parameters() if p.requires_grad)  # restored
    assert json.loads((run / "exported.json").read_text())["ema"] is True
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["ema"]["optimization_step"] == 4
    rebuilt, _ = DreamBoothModule.from_checkpoint(run / "checkpoints" / "last.ckpt")  # the export command's view
    assert all(torch.equal(p, shadow[n]) for n, p in rebuilt.named_parameters() if p.requires_grad)


@pytest.mark.integration
def test_export_model_disabled_writes_nothing(tiny_dir, photos, tmp_path):
    run = tmp_path / "run"
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        make_trainer(run, 1, [ExportModel(enabled=False)]).fit(DreamBoothModule(pretrained="tiny"),
                                                              datamodule=make_datamodule(photos))
    assert not run.exists() or list(run.iterdir()) == []
    assert "Exported" not in stdout.getvalue()


def test_interrupted_fit_records_and_exports_nothing(tiny_dir, photos, tmp_path):
    class Crash(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == 1:
                raise RuntimeError("node lost")

    run = tmp_path / "run"
    module, dm = DreamBoothModule(pretrained="tiny"), make_datamodule(photos)
    after = [RunRecord(), ExportModel(), LearningProbe(enabled=True)]
    logger = MemoryLogger()
    trainer = make_trainer(run, 3, [Crash(), *after], logger=logger, log_every_n_steps=1)
    with pytest.raises(RuntimeError, match="node lost"):
        trainer.fit(module, datamodule=dm)
    assert trainer.interrupted
    # Even when Lightning reaches on_fit_end of an interrupted fit, the callbacks leave it alone.
    for cb in after:
        cb.on_fit_end(trainer, module)
    assert not run.exists() or list(run.iterdir()) == []
    assert logger.values("probe/denoising_mse_base") == []


class CountingScore(SampleAndScore):
    """SampleAndScore that records the stages it ran."""

    def _run_stage(self, trainer, pl_module, stage, target, prompts, full):
        self.stages = [*getattr(self, "stages", []), stage]
        return super()._run_stage(trainer, pl_module, stage, target, prompts, full)


@pytest.mark.integration
def test_evaluation_runs_once_per_optimizer_step_with_gradient_accumulation(tiny_dir, photos, prompts_dir, tmp_path):
    cb = CountingScore(protocol=Protocol(images_per_prompt=1, steps=2, pres_images=1), every_n_steps=1, subset_prompts=1,
                       encoders="tiny", prompts_dir=str(prompts_dir), evaluate_base=False, final=False)
    trainer = make_trainer(tmp_path, 3, [cb], accumulate_grad_batches=2)
    trainer.fit(DreamBoothModule(pretrained="tiny"), datamodule=make_datamodule(photos, batch_size=1))
    # 6 batches, 3 optimizer steps: steps 1 and 2 scored once each (not at step 0, not twice, not at the last step).
    assert trainer.global_step == 3 and cb.stages == ["step000001", "step000002"]


@pytest.mark.integration
def test_a_two_subject_run_learns_both_and_scores_each(tiny_dir, prompts_dir, tmp_path):
    """`data.subjects`: one model learns two subjects (the probe improves for each), evaluation and the report are
    per subject (subjects/<name>/), val/<name>/* per subject and val/* their mean."""
    from dreambooth_pl.report import aggregate, write_report

    subjects = [dict(subject="ball", class_noun="toy", instance_dir=str(make_photos(tmp_path / "a", 3, seed=1)),
                     identifier="sks", class_dir=str(make_photos(tmp_path / "ca", 4, seed=3, kind="noise"))),
                dict(subject="mug", class_noun="cup", instance_dir=str(make_photos(tmp_path / "b", 3, seed=7)),
                     identifier="zwx", class_dir=str(make_photos(tmp_path / "cb", 4, seed=4, kind="noise")))]
    dm = make_datamodule({"instance": tmp_path / "a", "class": tmp_path / "ca"}, subject="pair", subjects=subjects,
                         class_dir=None)
    out, logger = tmp_path / "run", MemoryLogger()
    probe = LearningProbe(enabled=True)
    evaluation = SampleAndScore(protocol=Protocol(images_per_prompt=1, steps=2, pres_images=1), every_n_steps=0,
                                encoders="tiny", prompts_dir=str(prompts_dir), batch_size=8)
    pl.seed_everything(0)
    module = DreamBoothModule(pretrained="tiny", optim=Optimization(learning_rate=LR, lr_warmup_steps=WARMUP))
    with contextlib.redirect_stdout(io.StringIO()):
        make_trainer(out, STEPS, [evaluation, probe], logger=logger).fit(module, datamodule=dm)
    assert set(probe.results) == {"ball", "mug"}
    for name, (base, tuned) in probe.results.items():
        assert tuned <= 0.8 * base, (name, base, tuned)  # each subject's photos learnt
        assert logger.values(f"probe/{name}/denoising_mse_tuned") == [(STEPS, tuned)]
    for name, identifier in (("ball", "sks"), ("mug", "zwx")):
        m = json.loads((out / "subjects" / name / "metrics.json").read_text())
        assert m["subject"] == name and m["identifier"] == identifier and set(m["stages"]) == {"base", "final"}
        assert {Path(p).parent.name for p in m["real_photos"]} == {"a" if name == "ball" else "b"}
        assert (out / "subjects" / name / "samples" / "final" / "00_10000.png").is_file()
        write_report(out / "subjects" / name)
    final = next(row for _, row in reversed(logger.rows) if "val/dino" in row)
    assert final["val/dino"] == pytest.approx((final["val/ball/dino"] + final["val/mug/dino"]) / 2)
    table = aggregate(sorted(out.glob("subjects/*/metrics.json")), out / "report.md").read_text()
    assert "Subjects: ball, mug" in table
