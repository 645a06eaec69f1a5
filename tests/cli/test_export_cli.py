"""``padnet export RUN_DIR``: the deployment file of a trained run reloads as the trained model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import padnet
from padnet.cli.main import main
from padnet.train.build import load_run
from tiny_data import write_tiny_npz

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A tiny PAD run: resnet8 (width 4), dyconv, kappa 0.5, channel IMP, annealed temperature."""
    tmp = tmp_path_factory.mktemp("export")
    write_tiny_npz(tmp / "tiny.npz")
    config = tmp / "tiny.yaml"
    config.write_text(
        f"dataset: npz\ndata_root: {tmp / 'tiny.npz'}\nmodel: resnet8\nwidth: 4\n"
        f"batch_size: 16\nepochs: 1\nlr: 0.05\nmethod: dyconv\nnum_kernels: 2\n"
        f"dynamic_ratio: 0.5\nimp_mode: interleaved\nimp_iterations: 2\nimp_num_batches: 1\n"
        f"imp_granularity: channel\ntemperature_anneal_epochs: 2\nout_dir: {tmp / 'run'}\n")
    assert main(["train", "-c", str(config), "--quiet"]) == 0
    return tmp / "run"


def test_export_writes_a_file_that_loads_as_the_trained_model(run_dir, capsys) -> None:
    assert main(["export", str(run_dir), "--reps", "2", "--batch-sizes", "1,4"]) == 0
    out = capsys.readouterr().out
    assert "bytes (training form)" in out and "bytes (deployed" in out and "x  " in out
    deployed = padnet.load(run_dir / "deployed.safetensors")
    trained = load_run(run_dir, with_data=False).model
    x = torch.randn(5, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(deployed(x), trained(x), rtol=1e-5, atol=1e-6)


def test_export_to_onnx_on_request(run_dir, tmp_path) -> None:
    pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    path = tmp_path / "model.onnx"
    assert main(["export", str(run_dir), "--out", str(tmp_path / "d.safetensors"), "--onnx",
                 str(path), "--reps", "1", "--batch-sizes", "1"]) == 0
    session = ort.InferenceSession(str(path))
    trained = load_run(run_dir, with_data=False).model
    for batch in (1, 3):
        x = torch.randn(batch, 1, 8, 8)
        (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
        with torch.no_grad():
            np.testing.assert_allclose(got, trained(x).numpy(), rtol=1e-4, atol=1e-5)


def test_export_of_a_static_run_is_refused(tmp_path, capsys) -> None:
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", x=rng.integers(0, 255, (48, 8, 8)).astype(np.uint8),
             y=rng.integers(0, 2, 48))
    assert main(["train", "--dataset", "npz", "--data-root", str(tmp_path / "d.npz"),
                 "--model", "resnet8", "--width", "4", "--epochs", "1", "--batch-size", "16",
                 "--out-dir", str(tmp_path / "run"), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["export", str(tmp_path / "run")]) == 2
    assert "nothing to export" in capsys.readouterr().err
