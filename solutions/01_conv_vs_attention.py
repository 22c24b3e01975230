"""Answers to the exercises of 01_conv_vs_attention.py: one function per exercise, each computing
its answer and asserting it. No exercise needs data; `python solutions/01_conv_vs_attention.py`
runs them all in seconds, and tests/test_01_conv_vs_attention.py runs them too."""
import importlib
import math
import os
import sys

import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
m = importlib.import_module("01_conv_vs_attention")


def twin_error(conv, x, alpha):
    """Max |attention twin - conv| on x."""
    with torch.no_grad():
        return (m.attention_from_conv(conv, alpha)(x) - conv(x)).abs().max().item()


def exercise_1():
    """Predict, then measure alpha. The error is about c S with S ~ 4 e^-alpha, so it falls by
    e per unit of alpha: err(alpha) ~ err(8) e^-(alpha - 8), and err = 1e-3 at
    alpha = 8 + ln(err(8) / 1e-3). 4 e^-alpha = 1e-3 alone (c = 1) would say 8.3."""
    torch.manual_seed(0)                                   # demo_alpha's conv and input
    conv = nn.Conv2d(3, 4, 3, padding=1)
    x = torch.randn(2, 3, 8, 8)
    predicted = 8 + math.log(twin_error(conv, x, 8.0) / 1e-3)
    lo = 8.0                                               # err(8) = 3.2e-3 > 1e-3
    hi = 12.0                                              # err(12) = 5.8e-5 < 1e-3
    for _ in range(30):
        mid = (lo + hi) / 2
        if twin_error(conv, x, mid) > 1e-3:
            lo = mid
        else:
            hi = mid
    measured = (lo + hi) / 2
    naive = math.log(4 / 1e-3)
    print(f"exercise 1: max error 1e-3 at alpha = {measured:.2f} (measured by bisection); "
          f"predicted from the point at alpha 8: {predicted:.2f}; from 4 e^-alpha = 1e-3 "
          f"alone: {naive:.2f}")
    assert abs(predicted - measured) < 0.3
    assert 8.5 < measured < 9.5
    return {"measured": measured, "predicted": predicted, "naive": naive}


def exercise_2():
    """A 5x5 kernel: 25 heads; head h = i K + j = 4 * 5 + 4 = 24 attends to the offset (2, 2),
    so its non-locality is |(2, 2)| = sqrt(8) = 2.83 pixels (and the centre head's is 0)."""
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 3, 5, padding=2)
    H, W = 6, 7
    twin = m.attention_from_conv(conv)
    with torch.no_grad():
        _, probs = twin(torch.randn(1, 2, H, W), return_attn=True)   # (1, 25, N, M)
    D = m.nonlocality(probs[0], H, W, key_padding=2)                 # (25,) one per head
    head = 4 * 5 + 4
    print(f"exercise 2: {twin.num_heads} heads; head {head} (offset (2, 2)) has "
          f"non-locality {D[head].item():.3f} = sqrt(8) = {math.sqrt(8):.3f}")
    assert twin.num_heads == 25
    assert abs(D[head].item() - math.sqrt(8)) < 1e-4
    assert abs(D[12].item()) < 1e-4                                  # the centre tap
    return {"heads": twin.num_heads, "head": head, "nonlocality": D[head].item()}


def my_conv_pos_v(kernel_size, alpha):
    """Exercise 3's reference answer: v_h = -alpha (1, -2 Delta_h1, -2 Delta_h2), one row per
    head h = i K + j for the tap at offset Delta_h = (i - K//2, j - K//2). -> (K^2, 3)"""
    K = kernel_size
    rows = []
    for i in range(K):
        for j in range(K):
            delta_1 = i - K // 2
            delta_2 = j - K // 2
            rows.append([-alpha, 2 * alpha * delta_1, 2 * alpha * delta_2])
    return torch.tensor(rows, dtype=torch.float32)


def exercise_3():
    """Implement v_h: the same rows as conv_pos_v, and the twin built with them is the conv."""
    for K in (1, 3, 5):
        assert torch.allclose(my_conv_pos_v(K, 20.0), m.conv_pos_v(K, 20.0))
        torch.manual_seed(K)
        conv = nn.Conv2d(3, 4, K, padding=K // 2)
        twin = m.attention_from_conv(conv, 20.0)
        x = torch.randn(2, 3, 6, 7)
        with torch.no_grad():
            twin.pos_v.copy_(my_conv_pos_v(K, 20.0))
            assert torch.allclose(twin(x), conv(x), atol=1e-5)
    print("exercise 3: my_conv_pos_v gives conv_pos_v's rows; its twins equal the convs")
    return {"kernel_sizes": [1, 3, 5]}


def exercise_4():
    """A window as large as the image: K = 2 max(H, W) - 1 lets every pixel reach every pixel;
    with the same W_Q, W_K, W_V, the same tables in every head and W_O = I, SASA is global
    attention with learned relative embeddings."""
    torch.manual_seed(0)
    H, W, S = 5, 7, 7
    glob = m.MultiHeadSelfAttention2d(8, num_heads=2, positional="learned", max_size=S)
    loc = m.LocalSelfAttention2d(8, num_heads=2, window=2 * S - 1)
    with torch.no_grad():
        w_qkv = torch.cat([glob.query.weight, glob.key.weight, glob.value.weight])
        loc.qkv.weight.copy_(w_qkv[:, :, None, None])                # (3 C, C, 1, 1)
        loc.qkv.bias.copy_(torch.cat([glob.query.bias, glob.key.bias, glob.value.bias]))
        loc.rel_row.copy_(glob.rel_row.expand(2, -1, -1))             # every head: one table
        loc.rel_col.copy_(glob.rel_col.expand(2, -1, -1))
        glob.proj.weight.copy_(torch.eye(8))                          # SASA has no W_O
        glob.proj.bias.zero_()
        x = torch.randn(2, 8, H, W)
        err = (loc(x) - glob(x)).abs().max().item()
    print(f"exercise 4: window {2 * S - 1} on a {H}x{W} map vs global attention: "
          f"max difference {err:.1e}")
    assert err < 1e-5
    return {"max_abs_err": err}


def exercise_5():
    """Left from right: without positional tables, axial attention commutes with mirroring
    (attention over a set of pixels cannot tell their order), so it cannot tell whether one
    pixel is left of another. With the tables, mirroring changes the output."""
    torch.manual_seed(0)
    layer = m.AxialAttention2d(8, num_heads=2, max_size=6).eval()
    x = torch.randn(2, 8, 5, 6)
    with torch.no_grad():
        with_positions = (layer(x.flip(-1)) - layer(x).flip(-1)).abs().max().item()
        for axis_layer in (layer.height, layer.width):
            for name in ("rel_q", "rel_k", "rel_v"):
                getattr(axis_layer, name).zero_()
        content_only = (layer(x.flip(-1)) - layer(x).flip(-1)).abs().max().item()
    print(f"exercise 5: |layer(mirror x) - mirror layer(x)| = {with_positions:.2f} with "
          f"positions, {content_only:.1e} without")
    assert content_only < 1e-5
    assert with_positions > 1e-2
    return {"with_positions": with_positions, "content_only": content_only}


NO_DATA = [exercise_1, exercise_2, exercise_3, exercise_4, exercise_5]

if __name__ == "__main__":
    for exercise in NO_DATA:
        exercise()
