"""The run directory: one root, one folder per stage, and the embedded stores.

```
<root>/
  ingest/  dedup/  filter/  tokenizer/  shards/  train/  eval/   one folder per stage
  mlflow.db  mlartifacts/                                         MLflow tracking (SQLite)
  prefect/                                                        Prefect home (SQLite)
```
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

STAGES: tuple[str, ...] = ("ingest", "dedup", "filter", "tokenizer", "shards", "train", "eval")


@dataclass(frozen=True)
class RunLayout:
    root: Path

    @classmethod
    def at(cls, root: str | os.PathLike[str]) -> RunLayout:
        return cls(Path(root).expanduser().resolve())

    def stage_dir(self, stage: str) -> Path:
        if stage not in STAGES:
            raise ValueError(f"unknown stage {stage!r}; stages are {', '.join(STAGES)}")
        return self.root / stage

    @property
    def mlflow_db(self) -> Path:
        return self.root / "mlflow.db"

    @property
    def mlflow_tracking_uri(self) -> str:
        return f"sqlite:///{self.mlflow_db}"

    @property
    def mlflow_artifacts(self) -> Path:
        return self.root / "mlartifacts"

    @property
    def prefect_home(self) -> Path:
        return self.root / "prefect"

    def create(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        for stage in STAGES:
            (self.root / stage).mkdir(exist_ok=True)
