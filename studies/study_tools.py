"""What the reproduction studies share: the machine's name, the load average, markdown tables and result files.

    machine_name(device)                       -> benchmarks/harness.py's name, plus torch threads and version
    load_average(), markdown_table(headers, rows)   benchmarks/harness.py's
    write_results(stem, data, markdown, plot)  -> stem.json, stem.md and stem.png under studies/results/

Each study stays runnable on its own (`python3 studies/study_x.py`): it puts this folder on sys.path first, and this
module puts benchmarks/ there for the harness.
"""
import json
import pathlib
import sys

RESULTS = pathlib.Path(__file__).resolve().parent / "results"
sys.path.insert(0, str(RESULTS.parent.parent / "benchmarks"))

import harness  # noqa: E402
from harness import load_average, markdown_table  # noqa: E402, F401


def machine_name(device) -> str:
    import torch

    if torch.device(device).type == "cuda":
        return f"{harness.machine_name(device)}, torch {torch.__version__}"
    return f"{harness.machine_name(device)}, {torch.get_num_threads()} torch threads, torch {torch.__version__}"


def write_results(stem: str, data: dict, markdown: str, plot=None) -> pathlib.Path:
    """Write RESULTS/stem.{json,md} and, when given, plot(data, RESULTS/stem.png); returns the stem path."""
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / stem
    path.with_suffix(".json").write_text(json.dumps(data, indent=1) + "\n")
    path.with_suffix(".md").write_text(markdown + "\n")
    if plot is not None:
        import matplotlib

        matplotlib.use("Agg")
        plot(data, path.with_suffix(".png"))
    return path
