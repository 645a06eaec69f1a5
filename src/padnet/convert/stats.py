"""``padnet.stats``: stored parameters of a (partially) dynamic model, per layer and in total.

For a PAD weight with K dynamic factors of N positions each and dynamic ratio kappa, deployment
stores the dynamic values at dynamic positions and one static value elsewhere (docs/method.md §5)::

    stored = K * kappa * N + (1 - kappa) * N      (fully dynamic: K * N; static: N)

Every other parameter (routers, biases, normalisation, static layers) is counted as ``other``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from torch import nn

from padnet.layers.protocol import find_pad_layers, qualified_name

__all__ = ["LayerStats", "ModelStats", "stats"]


@dataclass
class LayerStats:
    """Counts for one PAD weight (one mask)."""

    name: str
    kind: str
    num_factors: int  # K kernels or E experts
    numel: int  # N positions of one weight
    num_dynamic: int  # kappa * N

    @property
    def dynamic_ratio(self) -> float:
        return self.num_dynamic / self.numel if self.numel else 0.0

    @property
    def dynamic_params(self) -> int:
        """Stored dynamic values: ``K * kappa * N``."""
        return self.num_factors * self.num_dynamic

    @property
    def static_params(self) -> int:
        """Stored static values: ``(1 - kappa) * N``."""
        return self.numel - self.num_dynamic

    @property
    def stored_params(self) -> int:
        return self.dynamic_params + self.static_params

    @property
    def fully_dynamic_params(self) -> int:
        return self.num_factors * self.numel

    def to_dict(self) -> dict:
        d = asdict(self)
        for key in ("dynamic_ratio", "dynamic_params", "static_params", "stored_params",
                    "fully_dynamic_params"):
            d[key] = getattr(self, key)
        return d


@dataclass
class ModelStats:
    """Per-layer :class:`LayerStats` plus the model's totals."""

    layers: list[LayerStats] = field(default_factory=list)
    other_params: int = 0  # parameters outside the PAD weights

    def _sum(self, attr: str) -> int:
        return sum(getattr(layer, attr) for layer in self.layers)

    @property
    def numel(self) -> int:
        return self._sum("numel")

    @property
    def num_dynamic(self) -> int:
        return self._sum("num_dynamic")

    @property
    def dynamic_ratio(self) -> float:
        """Global dynamic ratio over all PAD weights."""
        return self.num_dynamic / self.numel if self.numel else 0.0

    @property
    def dynamic_params(self) -> int:
        return self._sum("dynamic_params")

    @property
    def static_params(self) -> int:
        return self._sum("static_params")

    @property
    def stored_params(self) -> int:
        """PAD weights as deployed plus every other parameter."""
        return self._sum("stored_params") + self.other_params

    @property
    def fully_dynamic_params(self) -> int:
        return self._sum("fully_dynamic_params") + self.other_params

    def to_dict(self) -> dict:
        keys = ("numel", "num_dynamic", "dynamic_ratio", "dynamic_params", "static_params",
                "other_params", "stored_params", "fully_dynamic_params")
        return {"layers": [layer.to_dict() for layer in self.layers],
                "total": {k: getattr(self, k) for k in keys}}

    def __str__(self) -> str:
        head = ("layer", "kind", "K", "N", "ratio", "dynamic", "static", "stored", "fully dyn")
        rows = [head]
        for s in [*self.layers]:
            rows.append((s.name, s.kind, str(s.num_factors), f"{s.numel:,}",
                         f"{s.dynamic_ratio:.3f}", f"{s.dynamic_params:,}",
                         f"{s.static_params:,}", f"{s.stored_params:,}",
                         f"{s.fully_dynamic_params:,}"))
        rows.append(("other parameters", "", "", "", "", "", "", f"{self.other_params:,}",
                     f"{self.other_params:,}"))
        rows.append(("total", "", "", f"{self.numel:,}", f"{self.dynamic_ratio:.3f}",
                     f"{self.dynamic_params:,}", f"{self.static_params:,}",
                     f"{self.stored_params:,}", f"{self.fully_dynamic_params:,}"))
        widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
        fmt = [f"{{:<{w}}}" if i < 2 else f"{{:>{w}}}" for i, w in enumerate(widths)]
        lines = ["  ".join(f.format(c) for f, c in zip(fmt, r, strict=True)) for r in rows]
        rule = "-" * len(lines[0])
        return "\n".join([lines[0], rule, *lines[1:-2], rule, *lines[-2:]])


def stats(model: nn.Module) -> ModelStats:
    """Count stored parameters of ``model`` per PAD weight and in total.

    The PAD weights are those the model's PAD layers report (:func:`find_pad_layers`); each
    holds ``K * N`` dynamic and ``N`` static values. Print the result for a table, or call
    ``.to_dict()``.
    """
    result = ModelStats()
    pad_weight_params = 0
    for layer_name, layer in find_pad_layers(model):
        for w in layer.pad_weights():
            name = qualified_name(layer_name, layer, w.name)
            mask = w.mode_mask
            result.layers.append(LayerStats(name, type(layer).__name__, w.num_factors,
                                            mask.numel, mask.num_dynamic))
            pad_weight_params += w.dynamic.numel() + w.static.numel()
    total = sum(p.numel() for p in model.parameters())
    result.other_params = total - pad_weight_params
    return result
