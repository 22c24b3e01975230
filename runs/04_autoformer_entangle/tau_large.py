"""Kendall's tau of the rank table's subnets of 30k parameters or more (inherited vs alone),
per seed, read from rank.log. Run from the repository root:
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
    alone = [float(x) for x in cells[3].split("/")]
    inherited = [float(x) for x in cells[4].split("/")]
    by_seed.setdefault(int(cells[0]), []).append((float(cells[2][:-1]), alone, inherited))
print("Kendall tau(inherited, alone) among the subnets of >= 30k parameters, per seed")
for seed, rows in sorted(by_seed.items()):
    large = [r for r in rows if r[0] >= 30]
    tau_nll = m.kendall_tau([r[2][1] for r in large], [r[1][1] for r in large])
    tau_acc = m.kendall_tau([r[2][0] for r in large], [r[1][0] for r in large])
    spread = max(r[1][0] for r in large) - min(r[1][0] for r in large)
    print(f"seed {seed}: {len(large)} subnets, alone accuracies span {spread:.1f} points; "
          f"tau by NLL {tau_nll:+.2f}, by accuracy {tau_acc:+.2f}")
