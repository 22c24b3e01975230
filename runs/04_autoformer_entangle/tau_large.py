"""Kendall's tau (inherited vs alone, by validation NLL) of the rank table's subnets, per seed:
over the whole ladder, among the subnets below 30k parameters, among those of 30k or more, and
the share of (small, large) pairs that both orders put the same way. Read from rank.log,
whose NLLs are rounded to 3 decimals: a tie there can move a seed's tau over the ladder a
little from the one rank.log prints (seed 2: +0.61 here, +0.57 there).
Run from the repository root:
    python runs/04_autoformer_entangle/tau_large.py > runs/04_autoformer_entangle/tau_large.log"""
import importlib
import sys

sys.path.insert(0, ".")
m = importlib.import_module("04_autoformer_entangle")
by_seed = {}
for line in open("runs/04_autoformer_entangle/rank.log"):
    cells = [c.strip() for c in line.split("|")[1:-1]]
    if len(cells) != 5 or not cells[2].endswith("k"):
        continue
    alone = float(cells[3].split("/")[1])
    inherited = float(cells[4].split("/")[1])
    by_seed.setdefault(int(cells[0]), []).append((float(cells[2][:-1]), alone, inherited))


def tau(rows):
    return m.kendall_tau([r[2] for r in rows], [r[1] for r in rows])


print("Kendall tau(inherited, alone) by validation NLL, per seed")
for seed, rows in sorted(by_seed.items()):
    small = [r for r in rows if r[0] < 30]
    large = [r for r in rows if r[0] >= 30]
    cross = [(s, b) for s in small for b in large]
    same = sum((s[1] > b[1]) == (s[2] > b[2]) for s, b in cross)
    print(f"seed {seed}: ladder of {len(rows)} {tau(rows):+.2f}; "
          f"{len(small)} below 30k {tau(small):+.2f}; {len(large)} of 30k or more "
          f"{tau(large):+.2f}; (small, large) pairs in the same order {same} of {len(cross)}")
