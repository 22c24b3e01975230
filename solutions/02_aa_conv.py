"""Answers to the exercises of 02_aa_conv.py: one exercise_<n>() per exercise, each computing
its answer and asserting it. `python solutions/02_aa_conv.py` runs them all (none needs data).
"""
import importlib
import os
import sys

import torch
import torch.nn as nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
aa = importlib.import_module("02_aa_conv")


def exercise_1():
    """upsilon = 0: the layer is nn.Conv2d(3, 12, 3, padding=1), 3*12*9 + 12 = 336 weights."""
    torch.manual_seed(0)
    layer = aa.AugmentedConv2d(3, 12, 3, dk=0, dv=0, num_heads=1)
    conv = nn.Conv2d(3, 12, 3, padding=1)
    params = sum(p.numel() for p in layer.parameters())
    assert params == sum(p.numel() for p in conv.parameters()) == 3 * 12 * 9 + 12
    conv.load_state_dict(layer.conv.state_dict())
    x = torch.randn(2, 3, 9, 7)
    assert torch.allclose(layer(x), conv(x), atol=1e-6)
    return params


def exercise_2():
    """kappa = 0: every logit is 0, every weight 1/N, so each attention channel is W^O of the
    image's mean value vector: one constant per channel (spatial std 0), the global context
    of squeeze-and-excitation with no spatial structure."""
    res = aa.demo_branches(dk=0)
    std = res["spatial_std"]["attention"]
    assert std < 1e-6 < res["spatial_std"]["conv"]
    return std


def my_rel_to_abs(x):
    """Exercise 3: out[..., i, j] = x[..., i, (j - i) + L - 1], by gathering those columns."""
    *lead, L, M = x.shape
    if M != 2 * L - 1:
        raise ValueError(f"expected (..., L, 2L-1), got ({L}, {M})")
    i = torch.arange(L)[:, None]                      # (L, 1) queries
    j = torch.arange(L)[None, :]                      # (1, L) keys
    column = (j - i + L - 1).expand(*lead, L, L)      # the offset's column, (..., L, L)
    return torch.gather(x, -1, column)


def exercise_3():
    """my_rel_to_abs equals rel_to_abs on several shapes."""
    g = torch.Generator().manual_seed(3)
    for shape in ((1, 1), (3, 5), (2, 4, 7), (2, 2, 6, 11)):
        x = torch.randn(*shape, generator=g)
        assert torch.equal(my_rel_to_abs(x), aa.rel_to_abs(x)), shape
    return True


def exercise_4():
    """The query bias on a zero image: q = b_q and k = b_k = 0 at every pixel, so the content
    logits are 0; the position map of query (5, 2) is that of query (2, 5) moved by the
    offset between them (3 rows down, 3 columns left): a preference by relative position."""
    torch.manual_seed(0)
    layer = aa.AugmentedConv2d(8, 16, 3, dk=16, dv=8, num_heads=4, max_size=8)
    with torch.no_grad():
        layer.qkv.bias[:16] = torch.randn(16)
    x = torch.zeros(1, 8, 8, 8)
    content, pos_a, _ = aa.positional_map(layer, x, (2, 5))
    _, pos_b, _ = aa.positional_map(layer, x, (5, 2))
    assert content.abs().max() == 0
    # pos_b[y, x] = pos_a[y - 3, x + 3]: the same offsets from the two queries
    assert torch.allclose(pos_b[:, 3:, :5], pos_a[:, :5, 3:], atol=1e-6)
    assert not torch.allclose(pos_a, pos_b, atol=1e-3)
    return True


def exercise_5():
    """The long-range ResNet sees 25 rows (3, 7, 9, 13, 17, 25 through its layers); a unit
    must see side - 2*4 + 2 rows to touch both 4x4 squares, more than 25 from side 32 on."""
    largs = aa.long_range_args(aa.quick_args())
    rf = aa.receptive_field(aa.build_model(largs, 2, aa=False), 32)
    assert rf == 25
    smallest = next(side for side in range(8, 64) if side - 2 * aa.LONG_CUE + 2 > rf)
    assert smallest == 32
    return rf, smallest


EXERCISES = [exercise_1, exercise_2, exercise_3, exercise_4, exercise_5]

if __name__ == "__main__":
    for fn in EXERCISES:
        print(f"{fn.__name__}: {fn()}")
