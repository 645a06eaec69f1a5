"""TrainConfig: YAML loading, --key value overrides with type conversion, validation."""

from __future__ import annotations

import pytest

from padnet.train.config import (
    ImpConfig,
    TrainConfig,
    config_choices,
    load_config,
    parse_overrides,
)


def write(tmp_path, text: str):
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    return path


def test_yaml_and_overrides_are_converted_to_field_types(tmp_path):
    path = write(tmp_path, "model: resnet20\nlr: 1e-3\nepochs: 4\nsubset: null\n")
    cfg = load_config(path, ["--lr", "0.05", "--dynamic-ratio=0.3", "--pretrained", "yes",
                             "--moe-layers", "0,2", "--width", "none", "--amp", "bf16"])
    assert cfg.model == "resnet20" and cfg.epochs == 4 and cfg.subset is None
    assert cfg.lr == 0.05 and cfg.dynamic_ratio == 0.3 and cfg.pretrained is True
    assert cfg.moe_layers == [0, 2] and cfg.width is None and cfg.amp == "bf16"
    assert load_config(path).lr == 1e-3  # YAML reads "1e-3" as a string; it is converted


def test_round_trip_through_yaml(tmp_path):
    cfg = load_config(None, {"method": "dyconv", "moe_layers": [1], "grad_clip": 1})
    again = load_config(write(tmp_path, cfg.to_yaml()))
    assert again == cfg and isinstance(again.grad_clip, float)


@pytest.mark.parametrize("source", ["yaml", "override"])
def test_unknown_keys_list_the_valid_ones(tmp_path, source):
    path = write(tmp_path, "learning_rate: 0.1\n" if source == "yaml" else "lr: 0.1\n")
    overrides = ["--learning-rate", "0.1"] if source == "override" else []
    with pytest.raises(ValueError, match="unknown config key 'learning.rate'") as err:
        load_config(path, overrides)
    assert "valid keys: model, pretrained" in str(err.value) and "dynamic_ratio" in str(err.value)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["--dynamic-ratio", "1.5"], "dynamic_ratio must be in [0, 1], got 1.5"),
        (["--method", "moe2"], "method must be one of ('none', 'dyconv'"),
        (["--lr", "fast"], "lr expects a number, got 'fast'"),
        (["--epochs", "2.5"], "epochs expects an integer, got '2.5'"),
        (["--pretrained", "maybe"], "pretrained expects true or false"),
        (["--epochs", "0"], "epochs must be an int >= 1, got 0"),
        (["--imp-mode", "oneshot"], "imp_mode='oneshot' needs a dynamic method"),
        (["--top-k", "3", "--num-experts", "2"], "top_k must be <= num_experts (2)"),
        (["--imp-score", "psychic"], "imp_score must be one of"),
        (["--epochs"], "option --epochs needs a value"),
        (["epochs", "3"], "expected --key value, got 'epochs'"),
    ],
)
def test_bad_values_name_key_value_and_allowed(overrides, message):
    with pytest.raises(ValueError) as err:
        load_config(None, overrides)
    assert message in str(err.value)


def test_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ValueError, match="mapping"):
        load_config(write(tmp_path, "- a\n- b\n"))


def test_parse_overrides_checks_keys_and_keeps_strings():
    assert parse_overrides(["--lr", "0.1", "--out_dir=x"]) == {"lr": "0.1", "out_dir": "x"}


def test_replace_coerces_and_leaves_the_original():
    cfg = TrainConfig().replace(method="dyconv", dynamic_ratio="0.5")
    assert cfg.dynamic_ratio == 0.5 and TrainConfig().method == "none"


def test_imp_keys_are_flat_outside_and_a_group_inside(tmp_path):
    cfg = load_config(None, ["--method", "dyconv", "--imp-mode", "interleaved",
                             "--imp-score", "magnitude", "--imp-iterations", "3"])
    assert cfg.imp == ImpConfig(mode="interleaved", score="magnitude", iterations=3)
    flat = cfg.to_dict()
    assert flat["imp_score"] == "magnitude" and "imp" not in flat
    assert list(flat) == TrainConfig.keys()
    assert "imp_static_init" in TrainConfig.keys() and "imp" not in TrainConfig.keys()
    assert "imp_mode: interleaved" in cfg.to_yaml()
    assert cfg.replace(imp_mode="none").imp.mode == "none" and cfg.imp.mode == "interleaved"
    assert load_config(write(tmp_path, cfg.to_yaml())) == cfg
    with pytest.raises(ValueError, match="unknown config key 'imp'"):
        TrainConfig.from_dict({"imp": {"mode": "oneshot"}})


def test_choices_come_from_the_tables_that_define_them():
    from padnet.convert import method_names
    from padnet.layers import INITS, SCALE_MODES
    from padnet.partition import OPTIONS, SCORES

    choices = config_choices()
    assert choices["method"] == ("none", *method_names())
    assert choices["imp_score"] == tuple(SCORES.names())
    assert choices["imp_granularity"] == tuple(OPTIONS["granularity"])
    assert choices["init"] == tuple(INITS)
    assert set(SCALE_MODES) | {"s", "d"} == set(choices["scale_mode"])
    for mode in ("s", "d", "static_only"):  # aliases stay accepted in configs
        assert TrainConfig().replace(scale_mode=mode).scale_mode == mode


def test_oneshot_taylor_after_exact_copies_warns():
    import warnings

    from padnet.train.config import load_config

    args = ["--method", "dyconv", "--imp-mode", "oneshot"]
    with pytest.warns(UserWarning, match="every Taylor score is zero"):
        load_config(None, args)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_config(None, [*args, "--init", "copy_noise"])


@pytest.mark.parametrize(("text", "where"), [
    ("model: resnet8\nlr: [0.1\nepochs: 2\n", "line 3, column 7"),
    ("model: resnet8\n  lr: 0.1\n", "line 2, column 5"),
    ("model: 'resnet8\n", "line 2, column 1"),
], ids=["unclosed-bracket", "bad-indent", "unclosed-quote"])
def test_a_yaml_syntax_error_names_the_file_and_line(tmp_path, text, where):
    path = write(tmp_path, text)
    with pytest.raises(ValueError, match=rf"cfg\.yaml: {where}: YAML error"):
        load_config(path)


def test_a_config_that_is_not_text_is_refused(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_bytes(b"\x80\x04\x95 binary")
    with pytest.raises(ValueError, match=r"cfg\.yaml is not a text file"):
        load_config(path)
