"""What `randmask finetune` shows and writes besides the adapter: progress, memory, the plot, metrics.json and the
closing table.

    progress(iterable, enabled, **kw)   a tqdm bar, or the iterable itself
    bar_safe(log)                       a log function that prints above a running tqdm bar
    quiet_transformers()                no weight-loading bars or deprecation chatter between our own lines
    reset_peak_rss(), peak_rss_mib()    a per-method peak of resident memory (Linux; the process's peak elsewhere)
    plot_results(...)                   loss_curve.png: training loss per step and dev accuracy per epoch
    write_metrics(path, metrics)        metrics.json
    log_summary(...)                    the closing table of methods, accuracies, adapter sizes and times
"""
import json
import resource

__all__ = ["progress", "bar_safe", "quiet_transformers", "reset_peak_rss", "peak_rss_mib", "plot_results",
           "write_metrics", "log_summary"]


def progress(iterable, enabled, **kw):
    if not enabled:
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, **kw)


def bar_safe(log):
    """A log function that does not break a running tqdm bar."""
    def write(message=""):
        try:
            from tqdm import tqdm

            tqdm.write(message)
        except ImportError:
            log(message)
    return write


def quiet_transformers() -> None:
    """No per-tensor loading bars and no deprecation chatter between our own progress lines."""
    import warnings

    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:
        pass


def reset_peak_rss() -> None:
    """Start a new peak-memory window (Linux: VmHWM back to the current RSS); elsewhere the peak stays the
    process's."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_rss_mib() -> float:
    """Peak resident memory since the last reset_peak_rss (the process's peak where that cannot be reset)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def plot_results(results, zero, path, log, majority=None) -> None:
    """loss_curve.png: each method's training loss (raw and smoothed) and its dev accuracy (sft: dev loss) after
    every epoch, beside the zero-shot test result (`zero`, an evaluate() result) and the majority class's."""
    try:
        import matplotlib
    except ImportError:
        log("matplotlib is not installed: no loss_curve.png (pip install matplotlib)")
        return

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    key = "accuracy" if "accuracy" in zero else "loss"
    for r in results:
        y = r["train_loss"]
        k = max(1, len(y) // 25)
        smooth = [sum(y[max(0, i - k + 1):i + 1]) / len(y[max(0, i - k + 1):i + 1]) for i in range(len(y))]
        line, = ax.plot(range(1, len(y) + 1), y, alpha=0.25)
        ax.plot(range(1, len(y) + 1), smooth, color=line.get_color(),
                label=f"{r['method']} (lr {r['lr']:.3g}, {r['trainable']:,} trainable)")
        points = [(h["epoch"], h[f"dev_{key}"]) for h in r["history"] if h[f"dev_{key}"] is not None]
        if points:
            ax2.plot(*zip(*points), "o-", color=line.get_color(), label=f"{r['method']} dev (test "
                     f"{r[f'test_{key}']:.3f} at best epoch {r['best_epoch']})")
    ax2.axhline(zero[key], color="gray", linestyle="--", label=f"zero-shot (test {zero[key]:.3f})")
    if majority is not None:
        ax2.axhline(majority, color="black", linestyle=":", label=f"majority class (test {majority:.3f})")
    ax2.xaxis.get_major_locator().set_params(integer=True)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (" + ("option cross-entropy)" if key == "accuracy" else "completion tokens)"))
    ax.legend(fontsize=8)
    ax.set_title("training loss")
    ax2.set_xlabel("epoch")
    ax2.set_ylabel(key)
    ax2.set_title(f"dev {key} after each epoch")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_metrics(path, metrics: dict) -> None:
    with open(path, "w") as f:
        json.dump(metrics, f, indent=1)


def log_summary(results, zero, n_test: int, metrics: dict, output_dir: str, log) -> None:
    """The closing table: one row per method beside the baselines (the majority class and zero-shot; sft: zero-shot
    loss, perplexity and exact match, and the most frequent answer's exact match where one repeats), then the
    test-set size, wall time, peak memory and where it all went."""
    log("")
    if "accuracy" in zero:
        log(f"{'method':<10} {'trainable':>12} {'lr':>8} {'majority':>9} {'zero-shot':>10} {'fine-tuned':>11} "
            f"{'adapter':>11} {'train s':>8}")
        majority = metrics["majority"]["test_accuracy"]
        for r in results:
            log(f"{r['method']:<10} {r['trainable']:>12,} {r['lr']:>8.2g} {majority:>9.3f} {zero['accuracy']:>10.3f} "
                f"{r['test_accuracy']:>11.3f} {r['adapter_bytes'] / 1024:>8.1f} KiB {r['train_seconds']:>8.0f}")
    else:
        exact = zero["exact_match"] is not None
        log(f"{'method':<10} {'trainable':>12} {'lr':>8} {'test loss':>17} {'perplexity':>17} "
            + (f"{'exact match':>15} " if exact else "") + f"{'adapter':>11} {'train s':>8}")
        for r in results:
            log(f"{r['method']:<10} {r['trainable']:>12,} {r['lr']:>8.2g} {zero['loss']:>7.3f} -> "
                f"{r['test_loss']:<7.3f} {zero['perplexity']:>7.2f} -> {r['test_perplexity']:<7.2f} "
                + (f"{zero['exact_match']:>5.3f} -> {r['test_exact_match']:<5.3f} " if exact else "")
                + f"{r['adapter_bytes'] / 1024:>7.1f} KiB {r['train_seconds']:>8.0f}")
        majority = metrics.get("majority")
        log("(zero-shot -> fine-tuned" + ("; exact match: the greedy answer is the completion" if exact else
                                          "; exact match only for short answers")
            + (f"; always answering {majority['text']!r}: {majority['test_exact_match']:.3f}" if majority else "")
            + ")")
    log(f"test set: {n_test} examples; wall time {metrics['seconds']:.0f} s; peak memory (RSS) "
        f"{metrics['peak_rss_mib']:.0f} MiB; wrote metrics.json, loss_curve.png and the adapter to {output_dir}")
