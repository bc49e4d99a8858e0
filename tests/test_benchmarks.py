"""The benchmark tools: the harness's timing and dataset, report.py, and every bench script at tiny sizes (timings are
not checked). Every test writes into its own temporary dataset and never reads the committed results."""
import gzip
import json
import os
import pathlib
import re
import subprocess
import sys

import pytest

from randmask.kernels import native

BENCHMARKS = pathlib.Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
import harness  # noqa: E402
import report  # noqa: E402

HAS_NATIVE = native.status()[0] is not None


@pytest.fixture
def dataset(tmp_path, monkeypatch):
    """A fresh dataset path, also what the harness writes to by default in this test."""
    path = tmp_path / "results.jsonl"
    monkeypatch.setenv(harness.ENV_DATASET, str(path))
    return path


def test_a_gz_dataset_is_appended_to_and_read_as_one(tmp_path):
    path = tmp_path / "results.jsonl.gz"
    harness.append_rows([{"run": "a", "x": 1}], path)
    harness.append_rows([{"run": "b", "x": 2}, {"run": "b", "x": 3}], path)
    assert [row["x"] for row in harness.read_rows(path)] == [1, 2, 3]
    assert gzip.decompress(path.read_bytes()).count(b"\n") == 3  # compressed on disk


def test_the_default_dataset_is_redirected_by_the_environment(dataset):
    assert harness.dataset_path() == dataset.resolve()
    assert harness.dataset_path(dataset.parent / "other.jsonl") == (dataset.parent / "other.jsonl").resolve()


def test_time_interleaved_calls_before_just_before_every_timed_call():
    events = []
    fns = {name: (lambda name=name: events.append(name)) for name in ("a", "b", "c")}
    times = harness.time_interleaved(fns, "cpu", rounds=4, before=lambda: events.append("before"))
    assert {name: len(t) for name, t in times.items()} == {"a": 4, "b": 4, "c": 4}
    # warm_below_s=0: one untimed call of each variant in the first round only, then `before`, then the timed call
    first_round, later = events[:9], events[9:]
    assert [first_round[i:i + 3][1:] for i in range(0, 9, 3)] == [["before", first_round[i]] for i in range(0, 9, 3)]
    assert later[0::2] == ["before"] * 9 and sorted(later[1::2]) == sorted(["a", "b", "c"] * 3)


def test_run_appends_rows_with_the_shared_fields(dataset):
    first = harness.Run("masked_grad", "cpu", "float32_T8_1t")
    first.add({"shape": "4x4", "density": 0.5}, "native", [3e-3, 1e-3, 2e-3], "min", picks="native")
    first.add({"shape": "4x4", "density": 0.5}, "dispatch", [], s=None)
    second = harness.Run("masked_grad", "cpu", "float32_T8_1t")
    second.add({"shape": "4x4", "density": 0.5}, "native", [1.0, 3.0, 2.0])
    rows = harness.read_rows(dataset)
    assert len(rows) == 3 and all(set(harness.REQUIRED) <= set(row) for row in rows)
    assert rows[0]["s"] == 1e-3 and rows[0]["picks"] == "native" and rows[1]["s"] is None and rows[2]["s"] == 2.0
    assert rows[0]["run"] == rows[1]["run"] != rows[2]["run"]
    assert re.fullmatch(r"([0-9a-f]{4,40}(\+dirty)?|unknown)", rows[0]["commit"])
    assert rows[0]["date"].endswith("Z") and rows[0]["machine"] == harness.machine_name("cpu")
    assert harness.Run("masked_grad", "cpu", "float32_T8_1t", tag="cold").base["table"] == "float32_T8_1t_cold"


def test_the_commit_can_come_from_the_environment(monkeypatch):
    monkeypatch.setenv(harness.ENV_COMMIT, "abc1234+dirty")
    assert harness.git_commit() == "abc1234+dirty"


def synthetic_rows(dataset):
    """A run of each bench's layout, as the scripts write them (no timing)."""
    runs = {}

    def run(bench, table):
        runs[bench] = harness.Run(bench, "cpu", table, dataset)
        return runs[bench]

    grad = run("masked_grad", "float32_T8_1t")
    for density, n in ((0.1, 2), (0.5, 8)):
        params = {"shape": "4x4", "tokens": 8, "dtype": "float32", "density": density, "n": n, "threads": 1}
        for name, t in (("native", 1e-3), ("torch-dense", 2e-3 * density * 2), ("matmul-gather", 5e-3),
                        ("native@old", 2e-3), ("dispatch", 1.1e-3)):
            grad.add(params, name, [t, t * 1.1], picks="native" if name == "dispatch" else None)
    update = run("update", "4x4_1t")
    for n in (1, 10):
        params = {"shape": "4x4", "dtype": "float32", "n": n, "threads": 1, "path": "native"}
        for m, t in (("MaskedAdamW", 1.0), ("AdamW(fused)+index", 2.0), ("AdamW(foreach)+index", 3.0)):
            update.add(params, m, [t * n])
    positions = run("positions", "1t")
    positions.add({"case": "matrix", "shape": "4x4", "density": 0.5, "n": 8}, "randmask", [1e-4], peak_bytes=128,
                  peak_how="VmHWM")
    positions.add({"case": "matrix", "shape": "4x4", "density": 0.5, "n": 8}, "randperm", [1e-3], peak_bytes=1024)
    positions.add({"case": "model", "ratio": 1e-4, "model_params": 10**9, "matrices": 2, "entries": 10**8, "n": 10**4,
                   "density": 1e-4}, "randmask", [0.1], peak_bytes=2 * 10**5, how="measured")
    over = run("overhead", "1t")
    for name, backend, t in (("frozen", None, 5e-5), ("masked", "native", 9e-5)):
        over.add({"layer": "64x64", "tokens": 8, "n": 4, "calls": 3, "rounds": 2, "threads": 1, "backend": backend},
                 name, [t, t * 2], "min")
    e2e = run("e2e", "135m_float32")
    base = {"shape": "135m", "dtype": "float32", "batch": 1, "seq": 8, "compile": "none", "mode": "processes"}
    for round_ in (0, 1):
        e2e.add({**base, "setting": None, "round": round_}, "frozen", [1.0], peak_bytes=100, trainable=0)
        for method, t in (("randmask", 1.05), ("lora", 1.1)):
            e2e.add({**base, "setting": "qv", "round": round_}, method, [t + round_], peak_bytes=110, trainable=5,
                    adapter_bytes=2048)
    run("gather_sweep", "bfloat16").add({"shape": "4x4", "density": 0.5}, "gather[128x32,4]", [1e-4])
    return runs


def test_report_renders_every_layout_from_the_dataset_alone(dataset):
    runs = synthetic_rows(dataset)
    written = report.write_reports(harness.read_rows(dataset), dataset.parent, plots=False)
    texts = {p.name.split("_")[0]: p.read_text() for p in written}
    assert {p.suffix for p in written} == {".md"} and len(written) == len(runs)
    assert "| 5.0e-01 | 8 |" in texts["masked"] and "native / native@old by round" in texts["masked"]
    assert "MaskedAdamW / AdamW(fused)+index" in texts["update"] and "| float32 | 10 |" in texts["update"]
    assert "Llama-3-8B shape" in texts["positions"] and "randmask / randperm time" in texts["positions"]
    assert "| masked | native | 90.0 | 1.80 |" in texts["overhead"]
    # frozen (setting null) belongs to the qv table; randmask 1.05 / 1.0 in round 0 and 2.05 / 2.0 in round 1
    assert re.search(r"\| randmask \| 5 \| 1050\.0 \| 1\.05 \| 0\.95 \| 1\.5\d \(1\.05–2\.05\)", texts["e2e"])
    assert "gather[128x32,4]" in texts["gather"]


def test_report_picks_the_latest_run_of_each_table(dataset):
    older = harness.Run("overhead", "cpu", "1t", dataset)
    older.add({"layer": "64x64", "tokens": 8, "n": 4, "calls": 1, "threads": 1, "backend": None}, "frozen", [1.0])
    newer = harness.Run("overhead", "cpu", "1t", dataset)
    newer.base["date"] = "2999-01-01T00:00:00Z"
    newer.add({"layer": "64x64", "tokens": 8, "n": 4, "calls": 1, "threads": 1, "backend": None}, "frozen", [2.0])
    other = harness.Run("overhead", "cpu", "2t", dataset)
    other.add({"layer": "64x64", "tokens": 8, "n": 4, "calls": 1, "threads": 2, "backend": None}, "frozen", [3.0])
    assert set(report.latest_runs(harness.read_rows(dataset))) == {newer.id, other.id}


# ---------------------------------------------------------------------------------------------------- the scripts
def _run(script, dataset, *args, timeout=600):
    env = {**os.environ, "PYTHONPATH": str(BENCHMARKS.parent), harness.ENV_DATASET: str(dataset)}
    done = subprocess.run([sys.executable, str(BENCHMARKS / script), *args, "--results", str(dataset)],
                          capture_output=True, text=True, env=env, timeout=timeout)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-12000:]
    return done.stdout


def _rows(dataset, bench):
    rows = [row for row in harness.read_rows(dataset) if row["bench"] == bench]
    assert rows and all(set(harness.REQUIRED) <= set(row) for row in rows)
    return rows


@pytest.mark.full
def test_every_script_explains_itself():
    for script in ("bench_masked_grad.py", "bench_update.py", "bench_positions.py", "bench_overhead.py",
                   "bench_sparse_add.py", "bench_e2e.py", "bench_distributed.py", "bench_attention.py",
                   "profile_step.py", "profile_eval.py", "report.py"):
        done = subprocess.run([sys.executable, str(BENCHMARKS / script), "--help"], capture_output=True, text=True,
                              env={**os.environ, "PYTHONPATH": str(BENCHMARKS.parent)}, timeout=120)
        assert done.returncode == 0 and len(done.stdout) > 500, script


def _wheel(folder: pathlib.Path, name: str, version: str) -> pathlib.Path:
    """A minimal pure-Python wheel of an empty package `name`."""
    import zipfile

    path = folder / f"{name}-{version}-py3-none-any.whl"
    info = f"{name}-{version}.dist-info"
    files = {f"{name}/__init__.py": "",
             f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
             f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    files[f"{info}/RECORD"] = "".join(f"{f},,\n" for f in [*files, f"{info}/RECORD"])
    with zipfile.ZipFile(path, "w") as archive:
        for member, text in files.items():
            archive.writestr(member, text)
    return path


@pytest.mark.full
def test_gpu_check_lays_out_the_copy_installs_the_carried_wheels_and_runs_only_the_asked_sections(tmp_path):
    # what a device call does before its first section, on a copy of the tree without git metadata
    import shutil

    tree = tmp_path / "tree"
    for folder in ("randmask", "kernels", "benchmarks"):
        shutil.copytree(BENCHMARKS.parent / folder, tree / folder,
                        ignore=shutil.ignore_patterns("__pycache__", "results"))
    (tree / ".whl").mkdir()
    _wheel(tree / ".whl", "peft", "0.0.1")  # a carried version shadows the machine's own
    env = {**os.environ, "PYTHON": sys.executable, "TMPDIR": str(tmp_path), "RANDMASK_BENCH_COMMIT": "abc1234"}
    env.pop("PYTHONPATH", None)
    done = subprocess.run(["bash", str(tree / "benchmarks" / "gpu_check.sh"), str(tmp_path / "out"), "none"],
                          capture_output=True, text=True, env=env, timeout=300)
    log = (tmp_path / "out" / "gpu_check.txt").read_text()
    assert done.returncode == 0, log[-3000:]
    assert f"randmask from {tree / 'randmask' / '__init__.py'}" in log and "commit measured: abc1234" in log
    assert "peft 0.0.1" in log and "== section" not in log and "gpu_check done" in log


def test_bench_sparse_add_times_every_implementation_and_the_dense_baseline(dataset):
    _run("bench_sparse_add.py", dataset, "--shapes", "24x40", "--tokens", "32", "--densities", "0.05,0.5",
         "--repeats", "3", "--threads", "1")
    rows = _rows(dataset, "sparse_add")
    want = {"torch", "dense"} | ({"native"} if HAS_NATIVE else set())
    for op in ("sparse_add", "sparse_add_t"):
        assert {row["variant"] for row in rows if row["params"]["op"] == op} >= want
    assert all(len(row["seconds"]) == 3 for row in rows)


@pytest.mark.full
@pytest.mark.skipif(not HAS_NATIVE, reason="native CPU library not built")
def test_bench_masked_grad_cold_against_another_build(dataset):
    other = native.library_path()  # the same build under another name: the by-round ratio column must appear
    _run("bench_masked_grad.py", dataset, "--shapes", "24x40", "--tokens", "32", "--densities", "0.05,0.5",
         "--repeats", "3", "--cold", "--native-lib", str(other), "--threads", "1")
    rows = _rows(dataset, "masked_grad")
    variants = {row["variant"] for row in rows}
    assert {"dispatch", "torch-gather", "torch-dense", "native", f"native@{other.stem}", "matmul-gather",
            "official-gather", "official-sampled"} <= variants
    assert all(len(row["seconds"]) == 3 and row["params"]["cold"] for row in rows)
    assert {row["picks"] for row in rows if row["variant"] == "dispatch"} <= {"native", "torch-dense"}
    text = (dataset.parent / f"{report.stem(rows[0])}.md").read_text()
    assert f"native / native@{other.stem} by round" in text and "## 24x40" in text
    assert (dataset.parent / f"{report.stem(rows[0])}.png").exists()


@pytest.mark.full
def test_bench_update_and_overhead(dataset):
    _run("bench_update.py", dataset, "--shape", "64x96", "--ns", "10,100", "--repeats", "2", "--warmup", "1")
    assert {(row["params"]["n"], row["variant"]) for row in _rows(dataset, "update")} == {
        (n, m) for n in (10, 100) for m in ("MaskedAdamW", "AdamW(fused)+index", "AdamW(foreach)+index",
                                            "AdamW(fused)+sync")}
    _run("bench_overhead.py", dataset, "--calls", "3", "--rounds", "2", "--backends", "torch")
    rows = _rows(dataset, "overhead")
    assert {row["params"]["backend"] for row in rows if row["variant"] == "masked"} == {"torch"}
    assert all(row["stat"] == "min" and len(row["seconds"]) == 2 for row in rows)


@pytest.mark.full
def test_bench_positions_matrix_and_model(dataset):
    _run("bench_positions.py", dataset, "--shape", "64x96", "--densities", "0.01", "--repeats", "1",
         "--methods", "randmask,torch,rand", "--model-baselines", "skip", "--threads", "1")
    rows = _rows(dataset, "positions")
    assert {(row["params"]["case"], row["variant"]) for row in rows} == {
        ("matrix", "randmask"), ("matrix", "torch"), ("matrix", "rand"), ("model", "randmask"), ("model", "torch")}
    model = [row for row in rows if row["params"]["case"] == "model"]
    assert all(row["found"] == row["params"]["n"] and row["params"]["matrices"] == 224 for row in model)


@pytest.mark.full
def test_bench_e2e_per_process_and_in_one_process(dataset):
    small = ["--shape", "tiny", "--batch", "1", "--seq", "8", "--steps", "2", "--warmup", "1", "--settings", "qv"]
    _run("bench_e2e.py", dataset, *small, "--rounds", "1", "--methods", "frozen,randmask,lora")
    _run("bench_e2e.py", dataset, *small, "--one-process", "--methods", "frozen,randmask")
    rows = _rows(dataset, "e2e")
    per_process = [row for row in rows if row["params"]["mode"] == "processes"]
    assert {row["variant"]: row["params"]["setting"] for row in per_process} == {
        "frozen": None, "randmask": "qv", "lora": "qv"}
    assert all(row["peak_bytes"] > 0 and len(row["seconds"]) == 2 for row in per_process)
    assert next(row for row in per_process if row["variant"] == "randmask")["adapter_bytes"] > 0
    assert {row["table"] for row in rows} == {"tiny_float32", "tiny_float32_one-process"}


@pytest.mark.full
def test_bench_distributed_runs_one_process_ddp_and_fsdp(dataset):
    _run("bench_distributed.py", dataset, "--shape", "tiny", "--batch", "2", "--seq", "8", "--steps", "1",
         "--warmup", "0")
    rows = {row["variant"]: row for row in _rows(dataset, "distributed")}
    assert {v: r["params"]["ranks"] for v, r in rows.items()} == {"single": 1, "ddp": 2, "fsdp": 2}
    assert rows["ddp"]["base_bytes"] == rows["single"]["base_bytes"]  # every rank keeps the whole base
    assert rows["fsdp"]["base_bytes"] == pytest.approx(rows["single"]["base_bytes"] / 2, rel=0.05)  # half a rank
    assert all(row["peak_bytes"] > 0 and len(row["seconds"]) == 1 for row in rows.values())


@pytest.mark.full
def test_profile_step_times_masked_grad_calls_per_shape(dataset):
    _run("profile_step.py", dataset, "--method", "randmask", "--setting", "all-linear", "--masked-grad-calls",
         "--batch", "1", "--seq", "8", "--warmup", "1", "--steps", "1")
    calls = {row["params"]["shape"]: row["params"]["calls_per_step"] for row in _rows(dataset, "step_masked_grad")}
    # SmolLM2-135M's four shapes, each called once per layer and matrix (30 layers; q,o / k,v / gate,up / down)
    assert calls == {"576x576": 60, "192x576": 60, "1536x576": 60, "576x1536": 30}


@pytest.mark.full
def test_report_cli_lists_adds_and_renders_a_chosen_run(dataset, tmp_path):
    synthetic_rows(dataset)
    other = tmp_path / "device" / "results.jsonl"
    device_run = harness.Run("overhead", "cpu", "9t", other)
    device_run.add({"layer": "64x64", "tokens": 8, "n": 4, "calls": 1, "threads": 9, "backend": None}, "frozen", [1.0])
    env = {**os.environ, harness.ENV_DATASET: str(dataset)}

    def cli(*args):
        done = subprocess.run([sys.executable, str(BENCHMARKS / "report.py"), "--results", str(dataset), *args],
                              capture_output=True, text=True, env=env, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        return done.stdout

    rows = len(harness.read_rows(dataset))
    for _ in range(2):  # the second add finds the device run already there: nothing more appended
        cli("--add", str(other), "--out", str(tmp_path / "all"))
        assert len(harness.read_rows(dataset)) == rows + 1
    assert device_run.id in cli("--list")
    assert len(list((tmp_path / "all").glob("*.png"))) >= 5
    cli("--run", device_run.id, "--out", str(tmp_path / "one"))
    assert [p.name for p in (tmp_path / "one").glob("*.md")] == [f"{report.stem(device_run.rows[0], True)}.md"]
    assert sum(1 for line in dataset.read_text().splitlines() if json.loads(line)["run"] == device_run.id) == 1


# ---------------------------------------------------------------------------------------------------- quantized bases
def _step_args(**overrides):
    import argparse

    import bench_e2e

    parser = argparse.ArgumentParser()
    bench_e2e.add_step_arguments(parser)
    args = parser.parse_args(["--shape", "tiny", "--batch", "1", "--seq", "8"])
    return argparse.Namespace(**{**vars(args), "setting": "qv", "method": "frozen", **overrides})


def test_bench_e2e_builds_a_quantized_shape_from_meta_a_layer_at_a_time():
    import bench_e2e
    import bitsandbytes as bnb
    import torch

    from randmask import count_parameters

    model = bench_e2e.build_model(_step_args(quantize="4bit"))
    plain = bench_e2e.build_model(_step_args())
    linears = {name: m for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert type(linears.pop("lm_head")) is torch.nn.Linear and len(linears) == 14
    assert all(isinstance(m, bnb.nn.Linear4bit) and m.weight.quant_state.nested for m in linears.values())
    assert not any(p.is_meta for p in model.parameters()) and not any(b.is_meta for b in model.buffers())
    assert model.lm_head.weight is model.model.embed_tokens.weight  # the tied head stays tied
    assert count_parameters(model) == count_parameters(plain)
    norm = model.model.layers[0].input_layernorm.weight
    assert torch.equal(norm, torch.ones_like(norm)) and not model.model.embed_tokens.weight.requires_grad


@pytest.mark.parametrize("quantize", ["none", "4bit"])
def test_bench_e2e_methods_step_on_a_plain_and_a_4bit_base(quantize):
    import bench_e2e

    import randmask

    trainable = {}
    for method in ("frozen", "randmask", "randmask-additive", "lora", "shira"):
        model, step, params = bench_e2e.prepare(_step_args(quantize=quantize, method=method))
        step()
        trainable[method] = sum(p.numel() for p in params)
        modes = {layer.mode for _, layer in randmask.masked_layers(model)}
        if method.startswith("randmask"):
            assert modes == {"additive" if method == "randmask-additive" or quantize == "4bit" else "merged"}
    # q,v at 0.01% of the model: the share of the unpacked count, the same on either base
    plain_total = sum(p.numel() for p in bench_e2e.build_model(_step_args()).parameters())
    assert trainable["randmask"] == trainable["randmask-additive"] == round(1e-4 * plain_total)
    assert trainable["frozen"] == 0 and trainable["lora"] == trainable["shira"] == 2 * 8 * (64 + 64 + 64 + 32)
    if quantize == "4bit":
        with pytest.raises(ValueError, match="cannot hold"):
            bench_e2e.prepare(_step_args(quantize=quantize, method="naive"))


def test_bench_e2e_out_of_memory_is_a_result(monkeypatch, capsys):
    import bench_e2e
    import torch

    def oom(args):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(bench_e2e, "prepare", oom)
    bench_e2e.run_method(_step_args(method="randmask", warmup=1, steps=1))
    assert json.loads(capsys.readouterr().out) == {"method": "randmask", "oom": True, "peak_bytes": None,
                                                   "error": "CUDA out of memory. Tried to allocate 2.00 GiB"}


def test_fits_tries_the_largest_shape_first_and_stops_at_the_first_that_fits(dataset, monkeypatch):
    import bench_e2e

    calls = []

    def fake(args, method, setting):
        calls.append((args.shape, method, setting))
        if args.shape == "8b":
            return {"method": method, "oom": True, "peak_bytes": 140 << 30}
        return {"method": method, "step_s": 0.01, "steps_s": [0.01, 0.012], "trainable": 10,
                "peak_bytes": (100 if method == "randmask" else 120) << 20}

    monkeypatch.setattr(bench_e2e, "run_in_process", fake)
    bench_e2e.find_largest_fit(_step_args(fits="tiny,8b", quantize="4bit", dtype="bfloat16", device="cpu",
                                          warmup=1, steps=2, results=str(dataset), tag="", no_report=False))
    assert calls == [("8b", "randmask", "qv"), ("tiny", "randmask", "qv"), ("tiny", "lora", "qv")]
    rows = _rows(dataset, "fits")
    assert [(r["params"]["shape"], r["variant"], r["oom"], r["s"]) for r in rows] == [
        ("8b", "randmask", True, None), ("tiny", "randmask", False, 0.011), ("tiny", "lora", False, 0.011)]
    text = (dataset.parent / f"{report.stem(rows[0])}.md").read_text()
    assert "| 8b | 8.0 G | out of memory | not run |" in text and "| 100 | 120 | 0.83 |" in text
    assert "Largest that fits: tiny." in text


def test_report_names_the_quantized_base_and_compares_additive_with_merged(dataset):
    plain, four = harness.Run("e2e", "cpu", "tiny_float32", dataset), harness.Run("e2e", "cpu", "tiny_4bit", dataset)
    base = {"shape": "tiny", "dtype": "float32", "batch": 1, "seq": 8, "compile": "none", "mode": "one-process",
            "setting": "qv"}
    for method, t in (("frozen", 1.0), ("randmask", 1.02), ("randmask-additive", 1.05)):
        plain.add({**base, "quantize": "none"}, method, [t, t])
    for method, t in (("frozen", 2.0), ("randmask", 2.1), ("lora", 2.2)):
        four.add({**base, "quantize": "4bit"}, method, [t, t])
    texts = [p.read_text() for p in report.write_reports(harness.read_rows(dataset), dataset.parent, plots=False)]
    plain_text, four_text = sorted(texts, key=lambda text: "4bit base" in text)
    assert "randmask-additive × randmask (merged): 1.03 median step, 1.03 (1.03–1.03) by round (target" in plain_text
    assert "tiny shape, float32, 4bit base" in four_text and "lora is QLoRA" in four_text
    assert "| randmask | 0 | 2100.0 | 1.05 | 0.95 |" in four_text and "randmask-additive ×" not in four_text


@pytest.mark.full
def test_bench_e2e_quantized_one_process_and_fits_at_the_tiny_shape(dataset):
    small = ["--shape", "tiny", "--batch", "1", "--seq", "8", "--steps", "1", "--warmup", "1", "--quantize", "4bit"]
    _run("bench_e2e.py", dataset, *small, "--one-process", "--settings", "qv",
         "--methods", "frozen,randmask,lora,shira,full")
    _run("bench_e2e.py", dataset, *small, "--fits", "tiny")
    e2e = _rows(dataset, "e2e")
    assert {r["variant"] for r in e2e} == {"frozen", "randmask", "lora", "shira"}  # full: skipped on a 4bit base
    assert {r["table"] for r in e2e} == {"tiny_float32_4bit_one-process"}
    assert all(r["params"]["quantize"] == "4bit" for r in e2e)
    fits = _rows(dataset, "fits")
    assert [(r["params"]["shape"], r["params"]["setting"], r["variant"], r["oom"]) for r in fits] == [
        ("tiny", "qv", "randmask", False), ("tiny", "qv", "lora", False)]  # the q,v randmask step fits at tiny
    assert all(r["peak_bytes"] > 0 for r in fits)


def test_bench_attention_times_both_implementations_per_dtype(tmp_path, capsys):
    sys.path.insert(0, str(BENCHMARKS.parent / "tests" / "recipes"))
    import bench_attention
    from tiny_task import save_tiny_model_dir, write_csv

    model_dir, data = save_tiny_model_dir(tmp_path / "model"), write_csv(tmp_path / "d.csv")
    bench_attention.main(["--model", str(model_dir), "--data", str(data), "--dtypes", "float32,bfloat16",
                          "--steps", "1", "--max-eval", "8", "--rounds", "2"])
    rows = re.findall(r"^\| (float32|bfloat16) \| (\d+) ms \| (\d+) ms \| ([\d.]+)x \|", capsys.readouterr().out, re.M)
    assert [row[0] for row in rows] == ["float32", "bfloat16"] and all(float(row[3]) > 0 for row in rows)


def test_profile_eval_times_batch_sizes_and_groups_the_ops(tmp_path, capsys):
    sys.path.insert(0, str(BENCHMARKS.parent / "tests" / "recipes"))
    import profile_eval
    from tiny_task import save_tiny_model_dir, write_csv

    model_dir, data = save_tiny_model_dir(tmp_path / "model"), write_csv(tmp_path / "d.csv")
    profile_eval.main(["--model", str(model_dir), "--data", str(data), "--max-eval", "16", "--batch-sizes", "4,32",
                       "--rounds", "1"])
    out = capsys.readouterr().out
    assert "16 test examples" in out and "| 4 |" in out and "| 32 (default) |" in out and "1.00x" in out
    shares = [int(m) for m in re.findall(r"^\| (?:matrix products|attention|everything else) \| (\d+)%", out, re.M)]
    assert len(shares) == 3 and 98 <= sum(shares) <= 102 and shares[0] > 0
