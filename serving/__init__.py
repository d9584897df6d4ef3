"""Serving a trained model: loading it, the HTTP completions server, and the MLflow pyfunc wrapper.

Kept apart from `flows/` (orchestration) because serving runs long after, and
without, any pipeline run: `loading` turns a checkpoint folder, an MLflow model
URI or a run root into a model and tokenizer; `server` answers completions over
HTTP; `mlflow_model` and `mlflow_entry` make `mlflow.pyfunc.load_model` work.
"""
