"""Config keys as generated command-line flags (padnet.cli.options)."""

from __future__ import annotations

import argparse

import pytest

from padnet.cli.main import main
from padnet.cli.options import add_config_arguments, config_overrides, normalize_flags
from padnet.partition import SCORES


@pytest.mark.parametrize("command", ["train", "convert", "eval", "partition", "compare"])
def test_help_lists_config_keys_with_their_choices(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    out = capsys.readouterr().out
    assert exit_info.value.code == 0
    assert f"--imp-score {{{','.join(SCORES.names())}}}" in out
    assert "--method {none,dyconv,condconv,odconv,moe}" in out
    assert "--dynamic-ratio NUM" in out and "default 1.0" in out


def test_convert_help_shows_its_own_base_values(capsys):
    with pytest.raises(SystemExit):
        main(["convert", "--help"])
    out = capsys.readouterr().out
    assert "default resnet20" in out and "--check" in out and "--data-dir" in out


def _parser():
    parser = argparse.ArgumentParser()
    add_config_arguments(parser, ["lr", "pretrained", "moe_layers", "width", "imp_mode"])
    return parser


def test_only_the_given_flags_override_the_config():
    parser = _parser()
    assert config_overrides(parser.parse_args([])) == {}
    args = parser.parse_args(["--lr", "0.05", "--pretrained", "--moe-layers", "0,2",
                              "--width", "none", "--imp-mode=oneshot"])
    assert config_overrides(args) == {"lr": 0.05, "pretrained": True, "moe_layers": [0, 2],
                                      "width": None, "imp_mode": "oneshot"}
    assert config_overrides(parser.parse_args(["--pretrained", "no"])) == {"pretrained": False}


def test_keys_of_several_calls_are_all_read():
    parser = _parser()
    add_config_arguments(parser, ["seed"], title="more")
    assert config_overrides(parser.parse_args(["--seed", "3", "--lr", "1"])) == {
        "seed": 3, "lr": 1.0}


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["train", "--imp-score", "psychic"], "argument --imp-score: imp_score must be one of"),
        (["train", "--epochs", "2.5"], "epochs expects an integer, got '2.5'"),
        (["train", "--lr"], "argument --lr: expected one argument"),
        (["convert", "--width-mult", "wide"], "width_mult expects a number or none"),
    ],
)
def test_bad_flag_values_are_one_line_errors(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "usage:" not in err and len(err.strip().splitlines()) == 1


def test_underscores_in_flag_names_are_dashes():
    assert normalize_flags(["--dynamic_ratio=0.3", "--out_dir", "a_b", "--", "--x_y"]) == [
        "--dynamic-ratio=0.3", "--out-dir", "a_b", "--", "--x_y"]
