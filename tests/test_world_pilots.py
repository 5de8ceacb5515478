"""benchmarks/world_pilots.py: its options (the stage recipe's values where not given, one error for a misplaced one)
and the continuation's recipe."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from dreambooth_pl import world_models as wm

from .conftest import load_benchmark


@pytest.fixture(scope="module")
def pilots():
    return load_benchmark("world_pilots")


def test_options_left_out_take_the_stage_recipes_values(pilots):
    a = pilots.parse(["--stage", "ip2p"])
    assert (a.no_op, a.min_snr, a.guidance) == (wm.WorldRecipe().ip2p.no_op, wm.WorldRecipe().ip2p.min_snr_gamma, (5.0, 5.0))
    a = pilots.parse(["--stage", "ip2p", "--no-op", "0.3", "--min-snr", "1e9", "--guidance", "5", "1.5"])
    assert (a.no_op, a.min_snr, a.guidance) == (0.3, 1e9, (5.0, 1.5))
    assert pilots.parse([]).min_snr == wm.WorldRecipe().text2img.min_snr_gamma


@pytest.mark.parametrize(("argv", "named"), [(["--no-op", "0.3"], "--no-op"), (["--guidance", "5", "1.5"], "--guidance"),
                                             (["--stage", "ip2p", "--variant", "attn8"], "--variant"),
                                             (["--stage", "ip2p", "--from-scratch"], "--from-scratch")])
def test_an_option_the_stage_ignores_is_one_clear_error(pilots, argv, named, capsys):
    with pytest.raises(SystemExit) as e:
        pilots.parse(argv)
    assert e.value.code == 2 and f"{named} does not apply to --stage" in capsys.readouterr().err


def test_the_continuation_is_make_worlds_stage_with_the_pilots_steps_rate_and_a_short_warm_up(pilots):
    r = pilots.continuation_recipe(pilots.parse(["--steps", "10", "--lr", "1e-4", "--object-weight", "2"]))
    assert (r.steps, r.lr, r.warmup, r.object_weight) == (10, 1e-4, 100, 2.0)
    assert dataclasses.replace(r, steps=0, lr=0, warmup=0, object_weight=0) == dataclasses.replace(
        wm.WorldRecipe().text2img, steps=0, lr=0, warmup=0, object_weight=0)  # every other field the build's


@pytest.mark.parametrize(("argv", "says"), [(["--cell", "4"], "add --from-scratch"),
                                            (["--save", "x"], "add --from-scratch"),
                                            (["--from-scratch", "--cell", "4", "--variant", "attn8"], "grafts onto the f8")])
def test_the_f4_world_is_trained_from_scratch_in_its_own_unet(pilots, argv, says, capsys):
    with pytest.raises(SystemExit) as e:
        pilots.parse(argv)
    assert e.value.code == 2 and says in capsys.readouterr().err


def test_the_f4_vae_is_trained_once_judged_then_loaded_and_a_vae_of_another_cell_is_refused(pilots, tmp_path,
                                                                                             monkeypatch):
    tiny = wm.tiny_recipe().vae
    monkeypatch.setattr(pilots.wm, "VAERecipe", lambda: tiny)
    judged = []
    monkeypatch.setattr(pilots, "vae_judged", lambda vae, judge: judged.append(vae) or {"per_attribute": {}})
    a = pilots.parse(["--from-scratch", "--cell", "4", "--vae-dir", str(tmp_path / "vae")])
    vae, res = pilots.f4_vae(a, judge=None)
    assert list(vae.config.block_out_channels) == [16, 32, 64] and res["judged"] == {"per_attribute": {}} and res["cell"] == 4
    again, res_again = pilots.f4_vae(a, judge=None)
    assert res_again is None and len(judged) == 1  # loaded, not trained (nor judged) again
    assert all(torch.equal(p, q) for p, q in zip(vae.state_dict().values(), again.state_dict().values(), strict=True))
    a.cell = 8
    with pytest.raises(SystemExit, match="another latent cell"):
        pilots.f4_vae(a, judge=None)
