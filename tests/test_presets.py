"""Every script's paper presets (PRESETS beside its Args): each names only Args fields, `--preset NAME` gives those
values, and what a preset sets is consistent. What each preset holds is checked against the released settings in
the scripts' own unit tests."""

import dataclasses
import importlib

import pytest

import common

SIZES = ("hh-125m", "hh-1b", "hh-6b")
EXPECTED = {
    "ppo": {*SIZES, "tldr", "ppo-max"},
    "apa": {*SIZES, "tldr", "offline-hh-125m", "offline-hh-1b", "offline-hh-6b"},
    "awr": {*SIZES, "offline-hh-125m", "offline-hh-1b", "offline-hh-6b"},
    "ilql": set(SIZES),
    "alol": set(SIZES),
    "dpo": set(SIZES),
    "pro": set(SIZES),
}


@pytest.mark.parametrize("script", EXPECTED)
def test_every_preset_is_fields_of_args_that_parse_to_its_values(script):
    module = importlib.import_module(script)
    assert set(module.PRESETS) == EXPECTED[script]
    fields = {field.name for field in dataclasses.fields(module.Args)}
    for name, preset in module.PRESETS.items():
        assert set(preset) <= fields, (name, set(preset) - fields)
        built = dataclasses.replace(module.Args(), **preset)
        parsed = common.parse_args(module.Args, module.PRESETS, argv=["--preset", name])
        assert parsed.preset == name
        assert {key: getattr(parsed, key) for key in preset} == {key: getattr(built, key) for key in preset}, name
        if script in ("apa", "awr"):  # the offline presets, and only they, train on a dataset's rows
            assert (parsed.offline_dataset is not None) == name.startswith("offline-"), name
        if "rollout_batch_size" in preset or "mini_batch_size" in preset:
            assert getattr(parsed, "rollout_batch_size", 0) % parsed.mini_batch_size == 0, name
