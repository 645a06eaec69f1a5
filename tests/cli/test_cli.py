"""The command line, run in-process on tiny inputs in a temporary directory."""

from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file

import padnet
from padnet.cli.main import main
from padnet.models import create_model


def test_list_prints_models_and_methods(capsys):
    assert main(["list", "resnet*"]) == 0
    out = capsys.readouterr().out
    assert "resnet20" in out and "mobilenet_v2" not in out and "dyconv" in out


def test_convert_with_a_data_dir_lacking_the_files_says_how_to_get_them(tmp_path, capsys):
    argv = ["convert", "--model", "resnet8", "--check", "--data-dir", str(tmp_path)]
    assert main(argv) == 2
    assert "apt-get" in capsys.readouterr().err


def test_convert_checks_and_saves_loadable_weights(tmp_path, capsys):
    out_dir = tmp_path / "run"
    argv = ["convert", "--model", "resnet8", "--method", "condconv", "--dynamic-ratio", "0.5",
            "--check", "--batch-size", "4", "--image-size", "16", "--out", str(out_dir)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "condconv: converted" in out and "top-1 agreement 100.0%" in out
    summary = json.loads((out_dir / "summary.json").read_text())
    assert summary["check"]["relative_max_diff"] < 1e-5
    assert abs(summary["stats"]["dynamic_ratio"] - 0.5) < 0.01

    model = padnet.dynamize(create_model("resnet8", num_classes=10), "condconv")
    model.load_state_dict(load_file(out_dir / "model.safetensors"))
    assert abs(padnet.stats(model).dynamic_ratio - 0.5) < 0.01
    assert not list(out_dir.glob(".*.tmp"))  # no temporary files left behind


def test_convert_takes_a_training_config_and_include_patterns(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text("model: resnet8\nwidth: 4\nmethod: odconv\nnum_kernels: 2\n"
                      "dynamic_ratio: 0.5\nlr: 0.01\nimp_score: magnitude\n")
    assert main(["convert", "-c", str(config), "--include", "layer1.*,layer2.0.conv1"]) == 0
    out = capsys.readouterr().out
    assert "odconv: converted 3" in out and "layer3.0.conv1: Conv2d left static" in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["convert", "--model", "nope"], "nope"),
        (["convert", "--method", "moe2"], "method must be one of"),
        (["convert", "--dynamic-ratio", "1.5"], "dynamic_ratio must be in [0, 1], got 1.5"),
    ],
)
def test_user_errors_are_one_line_messages(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_module_entry_point_runs():
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "padnet", "--version"], capture_output=True,
                          text=True, check=True)
    assert done.stdout.strip() == f"padnet {padnet.__version__}"


def test_atomic_writes_leave_usual_permissions(tmp_path):
    import os

    from padnet.utils.io import save_json

    path = save_json(tmp_path / "x.json", {"a": 1})
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask


def test_convert_refuses_to_overwrite_earlier_output_without_overwrite(tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["convert", "--model", "resnet8", "--num-classes", "3", "--out", str(out)]
    assert main(argv) == 0
    before = (out / "model.safetensors").read_bytes()
    assert main([*argv, "--method", "condconv"]) == 2
    assert "already holds model.safetensors" in capsys.readouterr().err
    assert (out / "model.safetensors").read_bytes() == before
    assert main([*argv, "--method", "condconv", "--overwrite"]) == 0
