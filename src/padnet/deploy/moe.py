"""``DeployedMoE``: the deployment form of a (PAD-)MoE layer (docs/method.md §5).

The scale factors and masks are folded: each expert's effective weights
``W_e(eff) = lam_d M * W_e + lam_s (1 - M) * W_s`` are constants, so the deployed layer runs exactly
like a plain MoE with those experts (the static part joins each expert's weight once, at load
time, as the training form's ``fold`` path does at every step). Stored is the compact form of
:mod:`padnet.deploy.compact`: ``lam_s (1 - M) W_s`` at the static positions and ``lam_d M W_e``
at the dynamic ones, per matrix. Gated MoE layers (``spec['gated']``, docs/method.md §2.3) store
their third matrix ``w3`` (the up projection) the same way.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from padnet.deploy.compact import blank_mask_bits, pack, static_size, unpack
from padnet.layers.activations import ACTIVATIONS, activation_key
from padnet.layers.moe import MoE
from padnet.ops import dispatch as dsp
from padnet.ops import routing as rt

__all__ = ["DeployedMoE"]

_MATRICES = ("w1", "w2")
_GATED_MATRICES = ("w1", "w2", "w3")


class DeployedMoE(nn.Module):
    """Inference form of :class:`~padnet.layers.MoE`; build it with :meth:`from_layer`.

    ``DeployedMoE(spec, activation=None)`` makes an empty one for loading a state dict (the
    effective expert weights are derived once, when it is loaded); the activation comes from
    ``spec['activation']`` (a name of ``ACTIVATIONS``) unless given; ``spec['gated']`` (False
    when absent) selects gated experts.
    ``forward(x (..., hidden), padding_mask=None) -> (..., hidden)``; ``aux_loss`` stays None.
    """

    def __init__(self, spec: dict[str, Any], activation: Any = None) -> None:
        super().__init__()
        self.spec = dict(spec)
        s = self.spec
        h, i, e = s["hidden_size"], s["intermediate_size"], s["num_experts"]
        self.hidden_size, self.intermediate_size, self.num_experts = h, i, e
        self.top_k, self.capacity_factor = s["top_k"], s["capacity_factor"]
        self.gated = bool(s.get("gated", False))
        self.matrices = _GATED_MATRICES if self.gated else _MATRICES
        if activation is None:
            if s.get("activation") not in ACTIVATIONS:
                raise ValueError(f"activation {s.get('activation')!r} is not a known name: "
                                 "pass the activation module")
            activation = ACTIVATIONS[s["activation"]]
        self.act = activation
        self.router = nn.Linear(h, e, bias=False)
        self.shapes = {"w1": (i, h), "w2": (h, i), "w3": (i, h)}
        for m in self.matrices:
            n, nd = math.prod(self.shapes[m]), s[f"{m}_num_dynamic"]
            self.register_buffer(f"{m}_mask_bits", blank_mask_bits(n, nd))
            self.register_buffer(f"{m}_dynamic_values", torch.zeros(e, nd))
            pruned = s.get(f"{m}_pruned", False)
            self.register_buffer(f"{m}_static_values", torch.zeros(static_size(n, nd, pruned)))
        self.register_buffer("b1", torch.zeros(e, i) if s["bias"] else None)
        self.register_buffer("b2", torch.zeros(e, h) if s["bias"] else None)
        self.register_buffer("b3", torch.zeros(e, i) if s["bias"] and self.gated else None)
        self.padding_mask_hint: Tensor | None = None
        self.aux_loss = None
        for m in self.matrices:  # derived by rebuild() once the stored form is filled
            self.register_buffer(f"{m}_effective", None, persistent=False)
        self.register_load_state_dict_post_hook(lambda module, _: module.rebuild())

    @classmethod
    @torch.no_grad()
    def from_layer(cls, layer: MoE) -> DeployedMoE:
        """Fold a trained :class:`MoE` (its masks, scale factors, biases, router)."""
        spec = {"hidden_size": layer.hidden_size, "intermediate_size": layer.intermediate_size,
                "num_experts": layer.num_experts, "top_k": layer.top_k,
                "capacity_factor": layer.capacity_factor, "bias": layer.b1 is not None,
                "activation": activation_key(layer.act), "gated": layer.gated}
        stored = {}
        for w in layer.pad_weights():
            mm = w.mode_mask
            lam_d, lam_s = (float(v.detach()) for v in mm.scales())
            mask = mm.mask.to(w.dynamic.device)
            pruned = mm.pruned
            stored[w.name] = pack(w.dynamic * lam_d * mask, w.static * lam_s * ~mask, mask,
                                  pruned=pruned)
            spec[f"{w.name}_num_dynamic"] = int(mask.sum())
            spec[f"{w.name}_pruned"] = pruned
        out = cls(spec, activation=layer.act).to(device=layer.w1.device, dtype=layer.w1.dtype)
        out.router.weight.copy_(layer.router.weight)
        for m in out.matrices:
            for key, value in stored[m].items():
                getattr(out, f"{m}_{key}").copy_(value)
        for b in ("b1", "b2", "b3"):
            if getattr(out, b) is not None:
                getattr(out, b).copy_(getattr(layer, b))
        out.rebuild()
        return out.eval()

    @torch.no_grad()
    def rebuild(self) -> None:
        """Effective expert weights ``(E, out, in)`` from the stored form (not saved)."""
        for m in self.matrices:
            stored = {k: getattr(self, f"{m}_{k}") for k in
                      ("mask_bits", "dynamic_values", "static_values")}
            dynamic, static, _ = unpack(stored, self.shapes[m])
            self.register_buffer(f"{m}_effective", (dynamic + static).contiguous(),
                                 persistent=False)

    def forward(self, x: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        if self.w1_effective is None:
            raise RuntimeError("this DeployedMoE holds no weights yet: load a state dict "
                               "into it (padnet.load does) or make it with from_layer")
        if x.shape[-1] != self.hidden_size:
            raise ValueError(f"expected x of shape (..., {self.hidden_size}), got "
                             f"{tuple(x.shape)}")
        valid = rt.valid_tokens(x, padding_mask, self.padding_mask_hint)
        x2 = x.reshape(-1, self.hidden_size)  # (N, H)
        _, gates, experts, keep = rt.route_tokens(
            x2, self.router.weight, self.top_k, capacity_factor=self.capacity_factor,
            valid=valid)
        d = dsp.sort_by_expert(experts, self.num_experts, keep)
        xs = x2.index_select(0, d.token)  # (A, H)
        m1 = (self.w1_effective, None, None, self.b1)
        m2 = (self.w2_effective, None, None, self.b2)
        m3 = (self.w3_effective, None, None, self.b3) if self.gated else None
        y = dsp.grouped_ffn(xs, d, m1, m2, self.act, m3=m3)  # (A, H)
        return dsp.combine(y, d, gates, inplace=True).view(x.shape)

    def extra_repr(self) -> str:
        return (f"hidden_size={self.hidden_size}, intermediate_size={self.intermediate_size}, "
                f"num_experts={self.num_experts}, top_k={self.top_k}, gated={self.gated}")
