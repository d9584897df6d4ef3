"""The MLflow "model from code" entry: MLflow runs this file to build the pyfunc at load time.

Logging the model from code rather than pickling an object means loading it
executes only this project's code, never a deserialised object.
"""

import mlflow

from refinery.serving.mlflow_model import RefineryLM

mlflow.models.set_model(RefineryLM())
