"""nanochat/training.py's recipes and schedules: the LR, Muon momentum and weight-decay curves
base_train steps along, and the recipe a flag resolves to."""

import pytest

from nanochat.run_shape import run_shape
from nanochat.training import DEFAULT_RECIPE, RECIPES, get_lr_multiplier, get_muon_momentum, resolve_recipe, scaled_weight_decay


def test_nov2025_lr_schedule_is_constant_then_a_linear_warmdown_to_zero():
    lrm = [get_lr_multiplier(s, 100) for s in range(101)]
    assert lrm[0] == lrm[80] == 1.0 and lrm[90] == pytest.approx(0.5) and lrm[100] == 0.0


def test_jan2026_lr_schedule_warms_up_in_steps_and_ends_at_the_final_fraction():
    lrm = [get_lr_multiplier(s, 1000, warmdown_ratio=0.65, final_lr_frac=0.05, warmup_steps=40) for s in range(1001)]
    assert lrm[0] == pytest.approx(1 / 40) and lrm[39] == 1.0 and lrm[350] == 1.0
    assert lrm[1000] == pytest.approx(0.05) and lrm[675] == pytest.approx(0.525)


def test_muon_momentum_ramps_up_then_back_down_over_the_warmdown():
    assert get_muon_momentum(0) == 0.85 and get_muon_momentum(300) == get_muon_momentum(5000) == 0.95
    schedule = dict(ramp_steps=400, start=0.85, end=0.97, num_iterations=1000, warmdown_ratio=0.65, warmdown_end=0.90)
    assert get_muon_momentum(200, **schedule) == pytest.approx(0.91)
    assert get_muon_momentum(350, **schedule) == pytest.approx(0.97)  # the warmdown starts at step 350
    assert get_muon_momentum(1000, **schedule) == pytest.approx(0.90)


def test_weight_decay_scales_with_one_over_width_squared_from_d12():
    assert scaled_weight_decay(0.2, 12) == 0.2
    assert scaled_weight_decay(0.2, 24) == pytest.approx(0.05)
    assert scaled_weight_decay(0.0, 4) == 0.0


def test_recipes_resolve_with_the_users_flags_on_top():
    r = resolve_recipe("nov2025", orthogonalizer="polar_express", matrix_lr=None)
    assert r["orthogonalizer"] == "polar_express" and r["matrix_lr"] == RECIPES["nov2025"]["matrix_lr"]
    assert all(set(r) == set(RECIPES["nov2025"]) for r in RECIPES.values())  # every setting in every recipe
    with pytest.raises(ValueError, match="unknown --recipe 'x'; pick one of nov2025, jan2026, dec2026"):
        resolve_recipe("x")
    with pytest.raises(ValueError, match="unknown recipe settings"):
        resolve_recipe("nov2025", learning_rate=1.0)


def test_the_default_recipe_is_the_one_every_preset_runs_and_it_exports():
    assert DEFAULT_RECIPE == "dec2026"
    for preset in ("gpu", "tiny", "smoke"):
        assert run_shape(preset, "cpu").recipe == DEFAULT_RECIPE
    default = RECIPES[DEFAULT_RECIPE]
    assert default["arch"] == "classic"  # what transformers' NanoChat can load (nanochat/hf.py)
    assert default["packing"] == "bestfit" and default["weight_decay"] > 0 and default["normuon_beta2"] > 0
