"""Tiny models and data sets for the integration tests: a two-layer BERT whose FFNs are MoE
layers, a Hugging Face ResNet and a plain CNN whose convolutions are DY-Convs, a word-level
tokenizer built offline, and labelled token / image data sets (the label is learnable: it
depends on the input)."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import Dataset

import padnet

#: The tokenizer's vocabulary: special tokens, then words of the two classes.
WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "film", "was",
         "good", "great", "fun", "superb", "bad", "dull", "awful", "boring"]
POSITIVE, NEGATIVE = WORDS[8:12], WORDS[12:16]


def tiny_tokenizer():
    """A BERT word-piece tokenizer of :data:`WORDS`, made without any download."""
    import transformers

    return transformers.BertTokenizer(vocab={w: i for i, w in enumerate(WORDS)})


def tiny_bert(seed: int = 0, *, num_labels: int = 2, layers: int = 2):
    """A random BertForSequenceClassification (hidden 16, no dropout), eval mode."""
    import transformers

    torch.manual_seed(seed)
    config = transformers.BertConfig(
        vocab_size=len(WORDS), hidden_size=16, num_hidden_layers=layers, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=32, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0, num_labels=num_labels)
    return transformers.BertForSequenceClassification(config).eval()


def tiny_moe_bert(seed: int = 0, **kwargs):
    """:func:`tiny_bert` with every FFN upcycled to a MoE of 2 experts (noisy copies, so IMP's
    scores differ between positions)."""
    model = tiny_bert(seed)
    opts = {"num_experts": 2, "top_k": 2, "init": "copy_noise", "copy_noise_std": 0.1, **kwargs}
    return padnet.dynamize(model, "moe", **opts)


def sentences(n: int, seed: int = 0) -> list[tuple[str, int]]:
    """``n`` short texts with their label (1 when the adjective is positive)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        label = i % 2
        words = POSITIVE if label else NEGATIVE
        word = words[int(torch.randint(len(words), (1,), generator=gen))]
        out.append((f"a film was {word}" if i % 3 else f"{word} film", label))
    return out


class TokenData(Dataset):
    """Dicts of ``input_ids``, ``attention_mask`` (padded to 8) and ``labels``."""

    def __init__(self, n: int = 32, seed: int = 0) -> None:
        tok = tiny_tokenizer()
        texts = sentences(n, seed)
        enc = tok([t for t, _ in texts], padding="max_length", max_length=8,
                  return_tensors="pt")
        self.items = [{"input_ids": enc["input_ids"][i], "attention_mask":
                       enc["attention_mask"][i], "labels": torch.tensor(label)}
                      for i, (_, label) in enumerate(texts)]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return self.items[i]


def image_tensors(n: int = 48, seed: int = 0, *, classes: int = 3, size: int = 8):
    """``(x (n, 1, size, size), y (n,))``: the brightness of an image depends on its class."""
    gen = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % classes
    x = torch.rand(n, 1, size, size, generator=gen) + y.view(-1, 1, 1, 1).float()
    return x, y


class ImageData(Dataset):
    """Dicts of ``pixel_values`` and ``labels`` (the inputs of Hugging Face image models)."""

    def __init__(self, n: int = 48, seed: int = 0) -> None:
        self.x, self.y = image_tensors(n, seed)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> dict:
        return {"pixel_values": self.x[i], "labels": self.y[i]}


def tiny_hf_resnet(seed: int = 0, **kwargs):
    """A random transformers ResNetForImageClassification (1 channel, 3 classes) with every
    convolution but the stem a DY-Conv of 2 kernels."""
    import transformers

    torch.manual_seed(seed)
    config = transformers.ResNetConfig(num_channels=1, embedding_size=4, hidden_sizes=[4, 8],
                                       depths=[1, 1], layer_type="basic", num_labels=3)
    model = transformers.ResNetForImageClassification(config).eval()
    opts = {"num_kernels": 2, "init": "copy_noise", "copy_noise_std": 0.1, **kwargs}
    return padnet.dynamize(model, "dyconv", **opts)


def tiny_cnn(seed: int = 0, **kwargs) -> nn.Module:
    """Three convolutions and a classifier (1 channel in, 3 classes); the last two convolutions
    are DY-Convs of 2 kernels."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 6, 3, padding=1), nn.ReLU(),
        nn.Conv2d(6, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(8, 3))
    opts = {"num_kernels": 2, "init": "copy_noise", "copy_noise_std": 0.1, **kwargs}
    return padnet.dynamize(model, "dyconv", **opts)


def total_positions(model: nn.Module) -> int:
    """Positions N of all PAD weights of ``model``."""
    from padnet.partition import layer_ratio_report

    return sum(layer_ratio_report(model).numel)
