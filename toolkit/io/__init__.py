"""Files in and out of a run: checkpoints (atomic, verified), run-dir ownership, JSONL logging and the console,
plots, secret redaction, checkpoint merging and export to Hugging Face folders."""
