"""Resumable `randmask finetune` (randmask/recipes/train.py's checkpoints, finetune.py's --resume): a run killed
after k steps and resumed ends bitwise where an uninterrupted run ends (deltas, adapter, metrics); checkpoints are
written atomically; --resume without a checkpoint or with other settings is one line and exit status 2."""
import os

import pytest
import torch
from safetensors.torch import load_file
from tiny_task import run_cli

from randmask.recipes import finetune as F
from randmask.recipes import train as T

TIMING = ("train_seconds", "seconds", "seconds_per_step", "peak_rss_mib", "peak_cuda_mib")


class Killed(Exception):
    """Stands for the process being killed in the middle of a step."""


def settings(model_dir, csv_file, out, method, **kw):
    # 24 training examples in batches of 4: 6 steps an epoch, 12 in all
    values = dict(model=str(model_dir), data=str(csv_file), split=(40, 16, 16), max_train=24, epochs=2,
                  batch_size=4, methods=(method,), density=0.25, lr=1e-2 if method == "randmask" else 3e-3,
                  dtype="float32", threads=1, output_dir=str(out), progress=False, checkpoint_every=2)
    values.update(kw)
    return F.Settings(**values)


def kill_at_step(monkeypatch, k, only=None):
    """Make the optimizer's k-th step (of method `only`, or of any) raise Killed before it changes anything."""
    real = T.make_optimizer

    def make(method, params, lr):
        opt = real(method, params, lr)
        if only not in (None, method):
            return opt
        step, calls = opt.step, [0]

        def killing_step(*a, **kw):
            calls[0] += 1
            if calls[0] == k:
                raise Killed
            return step(*a, **kw)

        opt.step = killing_step
        return opt

    monkeypatch.setattr(T, "make_optimizer", make)


def count_steps(monkeypatch):
    """{method: the optimizer steps it takes}, counted from here on (a resume that restarted would take them all)."""
    real, steps = T.make_optimizer, {}

    def make(method, params, lr):
        opt = real(method, params, lr)
        step, steps[method] = opt.step, 0

        def counting_step(*a, **kw):
            steps[method] += 1
            return step(*a, **kw)

        opt.step = counting_step
        return opt

    monkeypatch.setattr(T, "make_optimizer", make)
    return steps


def trained_values(out, method):
    path = out / ("randmask_adapter.safetensors" if method == "randmask" else "lora_adapter/adapter_model.safetensors")
    return load_file(path)


def record(metrics, method):
    return {k: v for k, v in metrics["methods"][method].items() if k not in TIMING}


@pytest.fixture(scope="module")
def straight(tmp_path_factory, model_dir, csv_file):
    """The uninterrupted runs, once per method."""
    runs = {}

    def get(method):
        if method not in runs:
            out = tmp_path_factory.mktemp(f"straight-{method}")
            runs[method] = (out, F.run(settings(model_dir, csv_file, out, method), log=lambda *a: None))
        return runs[method]

    return get


# left: the steps the resumed run takes, 12 in all minus the checkpoint's: 12 - 4, 12 - 8, 12 - 6, 12 - 8
@pytest.mark.parametrize("method,kill,left", [("randmask", 5, 8), ("randmask", 10, 4), ("randmask", 7, 6),
                                              ("lora", 9, 4)])
def test_killed_and_resumed_run_is_bitwise_the_uninterrupted_one(tmp_path, monkeypatch, model_dir, csv_file,
                                                                  straight, method, kill, left):
    # kill 5: in epoch 1, last checkpoint at step 4; 10: in epoch 2 (step 8's checkpoint); 7: the first step of
    # epoch 2, the epoch-end checkpoint (step 6, after the dev evaluation) is the last
    ref_out, ref = straight(method)
    out = tmp_path / "run"
    kill_at_step(monkeypatch, kill)
    with pytest.raises(Killed):
        F.run(settings(model_dir, csv_file, out, method), log=lambda *a: None)
    assert sorted(os.listdir(out)) == [f"checkpoint-{method}.pt"]  # no temporary file left behind
    state = torch.load(out / f"checkpoint-{method}.pt", weights_only=True)
    assert state["step"] == (kill - 1) // 2 * 2
    monkeypatch.undo()

    steps = count_steps(monkeypatch)
    resumed = F.run(settings(model_dir, csv_file, out, method, resume=True), log=lambda *a: None)
    assert steps == {method: left}
    assert record(resumed, method) == record(ref, method)
    got, want = trained_values(out, method), trained_values(ref_out, method)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert resumed["zero_shot"]["test_accuracy"] == ref["zero_shot"]["test_accuracy"]


def test_resuming_a_finished_run_reproduces_it(monkeypatch, model_dir, csv_file, straight):
    ref_out, ref = straight("randmask")
    steps = count_steps(monkeypatch)
    again = F.run(settings(model_dir, csv_file, ref_out, "randmask", resume=True), log=lambda *a: None)
    assert steps == {"randmask": 0}  # the checkpoint is the end of epoch 2 of 2: 12 - 12 steps left
    assert record(again, "randmask") == record(ref, "randmask")


def test_resume_of_two_methods_killed_in_the_second(tmp_path, monkeypatch, model_dir, csv_file, straight):
    out = tmp_path / "run"
    two = dict(methods=("randmask", "lora"), lr=3e-3)
    kill_at_step(monkeypatch, 4, only="lora")
    with pytest.raises(Killed):
        F.run(settings(model_dir, csv_file, out, "randmask", **two), log=lambda *a: None)
    monkeypatch.undo()
    steps = count_steps(monkeypatch)
    resumed = F.run(settings(model_dir, csv_file, out, "randmask", resume=True, **two), log=lambda *a: None)
    assert steps == {"randmask": 0, "lora": 10}  # randmask finished (12 - 12); lora killed at 4, checkpoint 2: 12 - 2
    ref_lora = straight("lora")
    assert record(resumed, "lora") == record(ref_lora[1], "lora")
    got, want = trained_values(out, "lora"), trained_values(ref_lora[0], "lora")
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert resumed["methods"]["randmask"]["train_loss"][:1] and resumed["methods"]["randmask"]["steps"] == 12


def test_checkpoints_without_checkpoint_every_are_per_epoch(tmp_path, monkeypatch, model_dir, csv_file, straight):
    ref_out, ref = straight("randmask")
    out = tmp_path / "run"
    kill_at_step(monkeypatch, 11)
    with pytest.raises(Killed):
        F.run(settings(model_dir, csv_file, out, "randmask", checkpoint_every=None), log=lambda *a: None)
    assert torch.load(out / "checkpoint-randmask.pt", weights_only=True)["step"] == 6
    monkeypatch.undo()
    steps = count_steps(monkeypatch)
    resumed = F.run(settings(model_dir, csv_file, out, "randmask", checkpoint_every=None, resume=True),
                    log=lambda *a: None)
    assert steps == {"randmask": 6}  # killed at 11, the epoch-end checkpoint at 6: 12 - 6
    assert record(resumed, "randmask") == record(ref, "randmask")


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint-randmask.pt"
    T.save_checkpoint(path, {"format": T.CHECKPOINT_FORMAT, "n": 1})
    before = path.read_bytes()
    real = torch.save

    def half_then_fail(obj, f, *a, **kw):
        f.write(b"half a checkpoint")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", half_then_fail)
    with pytest.raises(OSError):
        T.save_checkpoint(path, {"format": T.CHECKPOINT_FORMAT, "n": 2})
    monkeypatch.setattr(torch, "save", real)
    assert path.read_bytes() == before and os.listdir(tmp_path) == [path.name]


# ---------------------------------------------------------------------------------------------------- errors
def cli(capsys, model_dir, csv_file, out, *extra):
    return run_cli(capsys, "finetune", "--model", str(model_dir), "--data", str(csv_file), "--split", "40,16,16",
                   "--max-train", "8", "--epochs", "1", "--batch-size", "4", "--density", "0.25", "--lr", "0.01",
                   "--dtype", "float32", "--threads", "1", "--output-dir", str(out), "--no-progress", *extra)


def test_resume_without_a_checkpoint(capsys, tmp_path, model_dir, csv_file):
    code, _, err = cli(capsys, model_dir, csv_file, tmp_path / "new", "--resume")
    assert code == 2 and err.count("\n") == 1
    assert "--resume: no checkpoint in" in err and "checkpoint-randmask.pt" in err
    assert not (tmp_path / "new").exists()


def test_resume_with_other_settings_or_a_bad_file(capsys, tmp_path, model_dir, csv_file):
    out = tmp_path / "run"
    code, _, err = cli(capsys, model_dir, csv_file, out)
    assert code == 0, err
    before = (out / "checkpoint-randmask.pt").read_bytes()
    code, _, err = cli(capsys, model_dir, csv_file, out, "--resume", "--seed", "3")
    assert code == 2 and err.count("\n") == 1 and "other settings" in err and "--seed 0 there, 3 here" in err
    assert (out / "checkpoint-randmask.pt").read_bytes() == before
    (out / "checkpoint-randmask.pt").write_bytes(b"not a checkpoint")
    code, _, err = cli(capsys, model_dir, csv_file, out, "--resume")
    assert code == 2 and err.count("\n") == 1 and "not a readable checkpoint" in err


def test_cli_user_errors_are_one_line_and_status_2(capsys, tmp_path, model_dir, csv_file, monkeypatch):
    a_file = tmp_path / "a_file"
    a_file.write_text("mine")
    cases = [
        (("--threads", "-1"), "--threads must be at least 1"),
        (("--threads", "0"), "--threads must be at least 1"),
        (("--checkpoint-every", "0"), "--checkpoint-every must be at least 1"),
        (("--clip", "-1"), "--clip must be 0 (none) or positive"),
        (("--output-dir", str(a_file)), "exists and is not a directory"),
        (("--output-dir", str(a_file / "sub")), "cannot create it"),
    ]
    for extra, message in cases:
        code, _, err = cli(capsys, model_dir, csv_file, tmp_path / "out", *extra)
        assert code == 2 and err.count("\n") == 1 and err.startswith("randmask finetune: error: "), (extra, err)
        assert message in err, (extra, err)
    assert a_file.read_text() == "mine"

    def denied(s, log=print):
        raise PermissionError(13, "Permission denied", "/somewhere/metrics.json")

    monkeypatch.setattr(F, "run", denied)
    code, _, err = cli(capsys, model_dir, csv_file, tmp_path / "out")
    assert code == 2 and err == "randmask finetune: error: Permission denied: /somewhere/metrics.json\n"


def test_help_explains_checkpoints(capsys):
    code, out, _ = run_cli(capsys, "finetune", "--help")
    assert code == 0
    for text in ("--checkpoint-every N", "--resume", "checkpoint-<method>.pt", "atomically", "bitwise"):
        assert text in out, text
