"""Answers to the exercises of 05_trionet_search.py: one function per exercise, each computing
its answer and asserting it. Exercises 1-4 need no data; `python solutions/05_trionet_search.py`
runs them in seconds, and tests/test_05_trionet_search.py runs them too. Exercise 5 trains on
CIFAR-10 (about 8 minutes on 2 cores): call exercise_5(data_dir) yourself."""
import importlib
import os
import sys
from collections import Counter

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
m = importlib.import_module("05_trionet_search")


def trained_shares(space, scheme, steps=2000):
    """% of trained blocks per operator type, replayed (no training)."""
    counts = Counter()
    for cfg in m.replay(space, seed=0, steps=steps, scheme=scheme, n_random=1):
        counts.update(ch.op for ch in cfg)
    total = sum(counts.values())
    return {op: 100 * counts[op] / total for op in space.ops}


def exercise_1():
    """Candidates per block with windows (3, 5, 7): conv 2 kernels x 3 widths = 6; local
    3 windows x 4 (width, heads) = 12; axial 4; 22 in all. Flat sampling trains a type in
    proportion to its candidates, 6/22, 12/22, 4/22 = 27.3 / 54.5 / 18.2 %; hierarchical
    trains each type a third. The third window takes flat training from conv and axial."""
    space = m.SearchSpace(**{**m.QUICK_SPACE, "local_windows": (3, 5, 7)})
    sizes = {op: len(space.candidates[0][op]) for op in space.ops}
    assert sizes == {"conv": 6, "local": 12, "axial": 4}
    predicted = {"flat": {op: 100 * n / 22 for op, n in sizes.items()},
                 "hierarchical": {op: 100 / 3 for op in space.ops}}
    measured = {}
    for scheme in ("hierarchical", "flat"):
        measured[scheme] = trained_shares(space, scheme)
        for op in space.ops:
            assert abs(measured[scheme][op] - predicted[scheme][op]) < 2, (scheme, op)
    flat = "/".join(f"{measured['flat'][op]:.1f}" for op in space.ops)
    hierarchical = "/".join(f"{measured['hierarchical'][op]:.1f}" for op in space.ops)
    print(f"exercise 1: flat trains conv/local/axial {flat} % (predicted 27.3/54.5/18.2); "
          f"hierarchical {hierarchical} %")
    return measured


def my_channel_index(choice, *, max_width, max_heads, sharing):
    """Exercise 2, the answer: multi-head sharing gives narrow head h the channels
    h * d_max + s, s < d; plain sharing the first C channels."""
    if sharing not in ("multihead", "plain"):
        raise ValueError(f"sharing must be 'multihead' or 'plain', got {sharing!r}")
    if choice.op == "conv" or sharing == "plain":
        return torch.arange(choice.width)
    d = choice.width // choice.heads
    d_max = max_width // max_heads
    index = []
    for h in range(choice.heads):
        index += [h * d_max + s for s in range(d)]
    return torch.tensor(index)


def exercise_2():
    """my_channel_index agrees with the script's channel_index on every candidate of a space
    where the schemes differ (the pytest command grades the student's version the same way)."""
    space = m.SearchSpace(**{**m.QUICK_SPACE, "mid_channels": (16, 16, 32), "max_heads": 4,
                             "head_choices": (2, 4), "width_ratios": (0.25, 0.75, 1.0)})
    checked = 0
    for b, cands in enumerate(space.candidates):
        for cs in cands.values():
            for c in cs:
                for sharing in ("multihead", "plain"):
                    kw = dict(max_width=space.mid[b], max_heads=space.max_heads,
                              sharing=sharing)
                    assert torch.equal(my_channel_index(c, **kw), m.channel_index(c, **kw))
                    checked += 1
    print(f"exercise 2: my_channel_index equals channel_index on {checked} (choice, scheme)")
    return checked


def exercise_3():
    """Budget 2.48 MFLOPs; the widest all-axial net (axial-c8h2 axial-c16h2 axial-c32h2) costs
    2.80. Per pixel, an axial block's operator costs 2(2(3C^2 + 3CR) + C^2) = 14C^2 + 12CR FLOPs
    against a 3x3 conv's 18C^2: the 12CR term (logits and sums along R pixels, two passes)
    grows with the map. It fits the budget only at 4-pixel images (0.153 <= 0.158)."""
    fits = {}
    for size in (4, 8, 12, 16):
        space = m.SearchSpace(**{**m.QUICK_SPACE, "image_size": size})
        axial = tuple(c["axial"][-1] for c in space.candidates)
        budget = space.flops(space.resnet_config())
        fits[size] = (space.flops(axial) / 1e6, budget / 1e6)
    assert round(fits[16][1], 2) == 2.48 and round(fits[16][0], 2) == 2.80
    assert [s for s, (a, b) in fits.items() if a <= b] == [4]
    print("exercise 3: widest all-axial vs budget, MFLOPs: "
          + ", ".join(f"{s} px {a:.2f} vs {b:.2f}" for s, (a, b) in fits.items()))
    return fits


def exercise_4():
    """With ties to the fewest heads, the smallest end of every step is a 1-head layer, the
    same under both schemes; of the largest (full width, 4 heads: d = d_max) neither differs;
    only the random member can: about 1/6 of attention training reaches layers where the
    schemes differ. Random ties raise it (to about 0.4)."""
    kw = dict(QUICK_SPACE_SHARING)
    space = m.SearchSpace(**kw)
    share = {}
    for ties in ("first", "random"):
        trained = []
        for seed in range(5):
            trained += m.replay(space, seed=seed, steps=117, scheme="hierarchical",
                                n_random=1, ties=ties)
        share[ties] = m.head_mix(space, trained)["differs"]
    assert abs(share["first"] - 1 / 6) < 0.02
    assert share["random"] > share["first"] + 0.15
    print(f"exercise 4: share of attention training where the schemes differ: ties to the "
          f"fewest heads {share['first']:.3f}, random ties {share['random']:.3f}")
    return share


QUICK_SPACE_SHARING = {**m.QUICK_SPACE, "ops": ("local", "axial"), "mid_channels": (16, 16, 32),
                       "max_heads": 4, "head_choices": (1, 2, 4),
                       "width_ratios": (0.25, 0.5, 1.0), "local_windows": (3,)}


def exercise_5(data_dir, out="runs/05_trionet_search/exercise_5"):
    """CIFAR-10, about 6 minutes: the search experiment with 6 supernet epochs and 3 seeds.
    Returns the entry check's per-seed tau and its line; compare it with the committed run."""
    result = m.main(["--quick", "--data", data_dir, "--experiment", "search",
                     "--supernet-epochs", "6", "--replicates", "3", "--out", out])
    search = result["search"]
    assert len(search["taus"]) == 3
    assert search["entry_check"]["line"].startswith("entry check: the supernet ranks")
    print(search["entry_check"]["line"])
    return search["taus"]


if __name__ == "__main__":
    for exercise in (exercise_1, exercise_2, exercise_3, exercise_4):
        exercise()
