"""A Hugging Face model directory is read from safetensors only: a directory whose weights are a
pickle (pytorch_model.bin) is refused with a clear message and the payload never runs."""

import pickle

import pytest

from padnet.train import load_config
from padnet.train.build import build_base_model

transformers = pytest.importorskip("transformers")


class Payload:
    def __init__(self, marker) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_a_pickled_hugging_face_checkpoint_is_refused(tmp_path) -> None:
    model_dir, marker = tmp_path / "bert", tmp_path / "executed"
    config = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
                                     num_attention_heads=2, intermediate_size=32)
    config.save_pretrained(model_dir)
    (model_dir / "pytorch_model.bin").write_bytes(pickle.dumps(Payload(marker)))
    cfg = load_config(overrides={"model": str(model_dir), "pretrained": True,
                                 "dataset": "csv"})
    with pytest.raises(ValueError, match=r"bert.*safetensors"):
        build_base_model(cfg, num_classes=2)
    assert not marker.exists()
