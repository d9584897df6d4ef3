"""Kept so that MLflow models logged before the move to `refinery.serving` still load.

A model logged from code stores a copy of its entry file, and the copies made
before the move run `from refinery.flows.mlflow_model import RefineryLM`. New
code imports `refinery.serving.mlflow_model`.
"""

from refinery.serving.mlflow_model import RefineryLM

__all__ = ["RefineryLM"]
