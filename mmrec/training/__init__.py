"""Training shared by `mmrec finetune` and the experiments: part of the runtime, so it never imports dask,
typer or transformers; `tokenizers` and `matplotlib` are imported only where used.

    errors.py    DataError, TrainingError, FinetuneRefused
    data.py      tokenizers, reading .txt/.jsonl documents, the token stream, LaneBatches
    device.py    device choice, autocast, RNG and recurrent-state save/restore, deferred Ctrl-C
    evaluate.py  held-out loss: lane-based `evaluate`, and `heldout_windows` + `score_windows` for any model
    schedule.py  warmup + cosine learning rate, AdamW
    outputs.py   JSON, loss log and plot, model and train_state writing
    finetune.py  FinetuneOptions and the fine-tuning loop
"""
