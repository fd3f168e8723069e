"""Linear layers tuned per device.

On CPU in float32, `PackedLinear` runs through oneDNN with the weight reordered once into oneDNN's
blocked layout (what torch.compile's CPU backend does). Measured on the 2-core test machine over the
default model's 120 projection matrices (weights in DRAM): 1.5x faster than `F.linear` (MKL) at 1 token,
1.7x at 16, 1.4x at 64, 1.15x at 256; outputs agree with `F.linear` to ~1e-5 (summation order).
The packed weight serves any batch size; `batch_hint` only tunes the packing.
"""

from __future__ import annotations

import torch
from torch import nn


def can_pack(weight: torch.Tensor) -> bool:
    return weight.device.type == "cpu" and weight.dtype == torch.float32 and torch.backends.mkldnn.is_available()


class PackedLinear(nn.Module):
    def __init__(self, linear: nn.Linear, batch_hint: int = 64):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        # An opaque oneDNN tensor, kept as a plain attribute: it is not a regular strided parameter.
        self.packed_weight = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), batch_hint)
        self.bias = None if linear.bias is None else linear.bias.detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        out = torch.ops.mkldnn._linear_pointwise(flat, self.packed_weight, self.bias, "none", [], "")
        return out.view(*x.shape[:-1], self.out_features)


def pack_linears(model: nn.Module) -> int:
    """Replace every packable nn.Linear of `model` by a PackedLinear; returns how many were replaced.

    A tied output projection gets its own packed copy; the embedding keeps the original matrix.
    """
    count = 0
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.Linear) and can_pack(child.weight):
                setattr(module, child_name, PackedLinear(child))
                count += 1
    return count
