"""train.py's configuration: every flag of the parser is one field of the frozen Config, in
one role, and the roles say what a resume may change."""
import dataclasses

import pytest

from harness import config


def _flags():
    parser = config.build_parser()
    return {action.dest for action in parser._actions if action.dest != "help"}


def test_every_flag_is_one_config_field_with_a_role():
    fields = {f.name: f.metadata.get("role") for f in dataclasses.fields(config.Config)}
    assert set(fields) == _flags()
    assert set(fields.values()) == {"identity", "may_change", "start"}


def test_the_flags_that_may_change_are_those_the_help_names():
    may_change = {f.name for f in dataclasses.fields(config.Config) if f.metadata["role"] == "may_change"}
    named = {text.split()[0].lstrip("-") for text in config.MAY_CHANGE if text.startswith("--")}
    assert may_change == named


def test_the_config_is_frozen_and_its_identity_leaves_out_flags_that_do_nothing():
    plain = config.parse_args(["--dataset", "digits"])
    with pytest.raises(dataclasses.FrozenInstanceError):
        plain.epochs = 3
    assert "swa_start" not in plain.identity() and "amp_dtype" not in plain.identity()
    averaged = config.parse_args(["--dataset", "digits", "--swa", "--swa_start", "5", "--epochs", "9"])
    assert "swa_start" in averaged.identity() and "model" in averaged.identity()
    assert averaged.differences(dict(averaged.as_dict(), swa_start=4)) == \
        ["--swa_start (run: 4, now: 5)"]
    # a run recorded before --ema_decay existed reads as the equal average it was
    recorded = {k: v for k, v in averaged.as_dict().items() if k != "ema_decay"}
    assert averaged.differences(recorded) == []
