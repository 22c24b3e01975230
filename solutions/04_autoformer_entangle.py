"""Answers to the exercises of 04_autoformer_entangle.py: one exercise_<n>() each, which computes
the answer and asserts it. `python solutions/04_autoformer_entangle.py` runs the ones that need
no data; exercise_5(data_dir) trains on CIFAR-10 (about 3 minutes on 2 CPU cores)."""
import importlib
import os
import random
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
m = importlib.import_module("04_autoformer_entangle")


def exercise_1():
    """Pd, Pm and crossover. The official swap (Pd 0.4, Pm 0.2) and no block mutations (Pm 0)
    change little: mutation of depth and C plus crossover still reach the optimum. With no
    mutation at all (Pd = Pm = 0), crossover can only recombine the genes of the first random
    population, and evolution falls to random search's level."""
    paper = m.demo_search()
    runs = {"paper": paper, "swapped": m.demo_search(p_depth=0.4, p_layer=0.2),
            "Pm = 0": m.demo_search(p_layer=0.0),
            "Pd = Pm = 0": m.demo_search(p_depth=0.0, p_layer=0.0)}
    found = {name: r["evolution"]["found"] for name, r in runs.items()}
    found["random search"] = paper["random"]["found"]
    print(f"share of 100 runs that end at the optimum: {found}")
    assert abs(found["swapped"] - found["paper"]) <= 0.05, found
    assert abs(found["Pm = 0"] - found["paper"]) <= 0.05, found
    assert found["Pd = Pm = 0"] < found["random search"] + 0.1 < found["paper"] - 0.5, found
    return found


def exercise_2():
    """Without relative positions the largest --quick subnet loses its tables: 4 per block
    (E_row and E_col, for keys and for values), each (2R + 2) x d = 30 x 16, in 3 blocks."""
    with_tables = int(m.space_param_counts().max())
    without = int(m.space_param_counts(max_rel=0).max())
    expected = 3 * 4 * (2 * 14 + 2) * 16
    print(f"largest subnet: {with_tables:,} parameters, {without:,} without relative "
          f"positions: {with_tables - without:,} fewer")
    assert with_tables - without == expected == 5760
    return with_tables - without


def my_extract_subnet(supernet, config):
    """Exercise 3: the reference answer. Every parameter of the plain ViT is the leading slice,
    in every dimension, of the supernet's parameter of the same name."""
    supernet.space.check(config)
    vit = m.build_subnet(supernet, config)
    source = supernet.state_dict()
    with torch.no_grad():
        for name, t in vit.state_dict().items():
            t.copy_(source[name][tuple(slice(0, n) for n in t.shape)])
    return vit


def exercise_3():
    """Graded by `python -m pytest tests/test_04_autoformer_entangle.py -k implement`; here one
    check that the answer above equals the supernet on a random subnet."""
    sn = m.SuperViT(m.QUICK_SPACE, **m.QUICK_IMAGE)
    config = m.sample_config(m.QUICK_SPACE, random.Random(0))
    x = torch.randn(2, 3, 24, 24)
    error = (my_extract_subnet(sn, config)(x) - sn(x, config)).abs().max().item()
    assert error < 1e-5, error
    return error


def exercise_4():
    """The search's direction: with the fitness's sign flipped, evolution climbs to the worst
    subnets. Its picks land at the bottom of the table, where the right sign lands at the top."""
    sn = m.SuperViT(m.QUICK_SPACE, **m.QUICK_IMAGE)
    ok = m.in_range(sn, (0.35, 0.70))
    configs = m.all_configs(m.QUICK_TABLE)
    table = m.synthetic_table(configs)
    inside = sorted(table[m.config_key(c)] for c in configs if ok(c))
    ranks = {}
    for sign in (1, -1):
        flipped = {k: sign * f for k, f in table.items()}
        curves = m.search_curves(flipped, m.QUICK_TABLE, constraint=ok, budget=100, runs=20,
                                 seed=0, population=10, parents=5, p_depth=0.2, p_layer=0.4)
        picks = [table[m.config_key(c)] for c in curves["evolution"][1]]
        # rank of each pick among the in-range subnets by the TRUE fitness (0 = worst)
        ranks[sign] = [inside.index(f) / (len(inside) - 1) for f in picks]
    mean = {sign: sum(r) / len(r) for sign, r in ranks.items()}
    print(f"mean rank of evolution's picks (0 = worst, 1 = best in range): right sign "
          f"{mean[1]:.3f}, flipped sign {mean[-1]:.3f}")
    assert mean[1] > 0.99 and mean[-1] < 0.01, mean
    return mean


def exercise_5(data_dir):
    """One supernet seed of the rank experiment on CIFAR-10 (seed 0, the first seed of
    runs/04_autoformer_entangle/rank.log: the same supernet and the same 8 subnets). Kendall's
    tau by NLL over the whole ladder, and among the subnets of 30k parameters or more. The
    supernet gets the coarse order right (small subnets below large ones), so tau over the
    ladder is positive; among the large subnets, whose scores alone differ by a point or two,
    its order is no better than chance, and that is where the search chooses."""
    r = m.main(["--quick", "--data", data_dir, "--experiment", "rank", "--seeds", "1",
                "--out", os.path.join("runs", "04_autoformer_entangle", "exercise_5")])
    subnets = r["rank"]["subnets"][0]

    def tau(rows):
        inherited = [x["inherited"][1] for x in rows]
        alone = [x["alone"][1] for x in rows]
        return m.kendall_tau(inherited, alone)
    large = [x for x in subnets if x["params"] >= 30_000]
    ladder = tau(subnets)
    among_large = tau(large)
    print(f"Kendall tau(inherited, alone) by NLL: the ladder of {len(subnets)} {ladder:+.2f}; "
          f"the {len(large)} subnets of >= 30k parameters {among_large:+.2f}")
    assert len(large) >= 3
    assert ladder > 0 and among_large < ladder, (ladder, among_large)
    return ladder, among_large


if __name__ == "__main__":
    for n in (1, 2, 3, 4):
        print(f"exercise {n}: {globals()[f'exercise_{n}']()}")
