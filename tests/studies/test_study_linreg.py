"""studies/study_linreg.py at a small size: the masked linear-regression measurements follow the theory's
directions, and the power iteration through studies/analysis.py on a MaskedLinear agrees with eigvalsh."""
import argparse
import importlib.util
import pathlib

import pytest

SCRIPT = pathlib.Path(__file__).resolve().parents[2] / "studies" / "study_linreg.py"


@pytest.fixture(scope="module")
def sl():
    spec = importlib.util.spec_from_file_location("study_linreg", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_small_study(sl):
    args = argparse.Namespace(n=8, d=2000, p_min=0.02, points=5, seeds=2, seed=0, gd_steps=100, bisect_rel=0.02,
                              randmask_ps=[1.0, 0.1], power_iters=300, stem="unused", argv="--n 8 --d 2000")
    data = sl.run(args)
    mean = data["mean"]
    assert all(a < b for a, b in zip(mean["lambda_max"], mean["lambda_max"][1:]))  # flatter at smaller p
    assert all(a > b for a, b in zip(mean["distance"], mean["distance"][1:]))  # farther at smaller p
    assert data["fits"]["lambda_max"]["slope_k_ge_10n"] > 0 > data["fits"]["distance"]["slope_k_ge_10n"]
    for c in data["randmask_check"]:
        assert c["rel_diff"] < 1e-3, c
    text = sl.to_markdown(data)
    assert "`python3 studies/study_linreg.py --n 8 --d 2000`" in text and "## Fitted log-log slopes" in text
