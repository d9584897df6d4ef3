"""The run directory: one root, one folder per stage, and the embedded stores.

```
<root>/
  ingest/  dedup/  filter/  tokenizer/  shards/  train/  eval/   one folder per stage (flows/stages.py)
  mlflow.db  mlartifacts/                                         MLflow tracking (SQLite)
  prefect/                                                        Prefect home (SQLite)
```
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path


@contextlib.contextmanager
def fluent_tracking(uri: str) -> Iterator[None]:
    """Point MLflow's fluent API (`start_run`, `log_model`, `register_model`) at `uri`, then restore it.

    `mlflow.set_tracking_uri` is process-wide and also exports `MLFLOW_TRACKING_URI`, which
    `RunLayout.tracking_uri` reads as the user's choice: left set, one run root's store would
    become every later command's store in the same process.
    """
    import mlflow
    from mlflow.tracking._tracking_service import utils as tracking_utils

    before_global = getattr(tracking_utils, "_tracking_uri", None)
    before_env = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(before_global)
        if before_env is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = before_env


@dataclass(frozen=True)
class RunLayout:
    root: Path

    @classmethod
    def at(cls, root: str | os.PathLike[str]) -> RunLayout:
        return cls(Path(root).expanduser().resolve())

    def stage_dir(self, stage: str) -> Path:
        """The folder of a stage (the stage graph decides which stages exist)."""
        if not re.fullmatch(r"[a-z][a-z0-9_]*", stage):
            raise ValueError(f"{stage!r} is not a stage name")
        return self.root / stage

    @property
    def mlflow_db(self) -> Path:
        return self.root / "mlflow.db"

    @property
    def mlflow_tracking_uri(self) -> str:
        return f"sqlite:///{self.mlflow_db}"

    def tracking_uri(self, configured: str | None = None) -> str:
        """The MLflow tracking URI of this run root; every command resolves it here.

        In order: `configured` (the config's `tracking.mlflow_uri`), then the
        `MLFLOW_TRACKING_URI` environment variable (a tracking server, e.g. under
        the compose stack), then the embedded SQLite store inside the root.
        """
        return configured or os.environ.get("MLFLOW_TRACKING_URI") or self.mlflow_tracking_uri

    def has_tracking(self, configured: str | None = None) -> bool:
        """Whether a tracking store is there to read: a configured or environment URI, or the root's SQLite file."""
        return bool(configured or os.environ.get("MLFLOW_TRACKING_URI")) or self.mlflow_db.is_file()

    @property
    def mlflow_artifacts(self) -> Path:
        return self.root / "mlartifacts"

    @property
    def prefect_home(self) -> Path:
        return self.root / "prefect"

    def create(self, stages: Iterable[str] = ()) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        for stage in stages:
            self.stage_dir(stage).mkdir(exist_ok=True)
