"""Every script is also a notebook (jupytext percent cells). These tests open it the way a reader
does, in Jupyter, and "Run All" on a real kernel with no data: the demos draw their figures
inline, and the last cell starts no training run. `--demo` runs the same demos from the shell."""
import os
import re
import subprocess
import sys

import pytest

from conftest import ROOT, SCRIPTS

jupytext = pytest.importorskip("jupytext", reason="pip install -r requirements-dev.txt")
nbclient = pytest.importorskip("nbclient", reason="pip install -r requirements-dev.txt")
pytest.importorskip("ipykernel", reason="pip install -r requirements-dev.txt")


def _read(script):
    return open(os.path.join(ROOT, f"{script}.py")).read()


@pytest.mark.parametrize("script", SCRIPTS)
def test_script_runs_all_as_a_notebook_without_data(script, tmp_path):
    nb = jupytext.reads(_read(script), fmt="py:percent")
    markdown = [c for c in nb.cells if c.cell_type == "markdown"]
    assert len(markdown) >= 5, f"{script}: {len(markdown)} markdown cells; the paper needs prose"
    assert any(re.search(r"^#+ *Exercises", c.source, re.M) for c in markdown), script
    env = {**os.environ, "CMA_CACHE": str(tmp_path / "cache"), "MPLBACKEND": "Agg"}
    env.pop("DATA_DIR", None)                                  # no data, no download
    had_data = os.path.exists(os.path.join(ROOT, "data"))
    # "Run All": every cell in order on a fresh kernel; an error in any cell raises here
    nbclient.NotebookClient(nb, timeout=600, kernel_name="python3").execute(env=env, cwd=ROOT)
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) >= 3, f"{script}: {len(images)} figures drawn inline; expected the demos'"
    text = "".join(o.get("text", "") for o in outputs)
    assert "notebook: the demos above ran" in text, "the last cell must not start the lab"
    assert had_data or not os.path.exists(os.path.join(ROOT, "data")), "Run All downloaded data"


@pytest.mark.parametrize("script", SCRIPTS)
def test_demo_runs_from_the_shell_without_data(script, tmp_path):
    env = {**os.environ, "CMA_CACHE": str(tmp_path / "cache"), "MPLBACKEND": "Agg"}
    r = subprocess.run([sys.executable, f"{script}.py", "--demo", "--out", str(tmp_path)],
                       cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    pngs = [f for f in os.listdir(tmp_path) if f.endswith(".png")]
    assert len(pngs) >= 3 and "demo.json" in os.listdir(tmp_path), (pngs, r.stdout[-2000:])
    assert "decoding" not in r.stdout, "--demo must not need data"


def test_the_lab_runs_from_a_notebook_even_with_worker_processes(tiny_gray_folder, tmp_path):
    """In a notebook, train_job lives in a __main__ without a file, which a spawned worker cannot
    import (BrokenProcessPool). Called from a cell with --workers 2, the lab runs its jobs in the
    kernel instead, says so, and prints its verdicts."""
    nb = jupytext.reads(_read("01_conv_vs_attention"), fmt="py:percent")
    argv = ["--quick", "--data", tiny_gray_folder, "--image-size", "16", "--epochs", "1",
            "--widths", "8,8,16", "--head-dim", "4", "--batch-size", "12", "--stem-stride", "1",
            "--seeds", "2", "--models", "all-conv,hybrid", "--experiment", "compare",
            "--workers", "2", "--out", str(tmp_path / "out")]
    nb.cells.append(jupytext.reads(f"res = main({argv!r})", fmt="py:percent").cells[0])
    env = {**os.environ, "CMA_CACHE": str(tmp_path / "cache"), "MPLBACKEND": "Agg"}
    nbclient.NotebookClient(nb, timeout=600, kernel_name="python3").execute(env=env, cwd=ROOT)
    text = "".join(o.get("text", "") for o in nb.cells[-1].get("outputs", []))
    assert "cannot be sent to worker processes" in text, text[-2000:]
    assert "hybrid \u2212 all-conv = " in text and "n=2 paired seeds" in text, text[-2000:]
