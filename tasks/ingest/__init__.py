"""Ingest: raw files and datasets to the documents table, with a quarantine for bad input.

The flow calls `source_digest` (skip the stage when nothing changed) and
`run_ingest`; `use_offline_nlp` keeps unstructured's partitioners off the network.
"""

from refinery.tasks.ingest.config import IngestConfig
from refinery.tasks.ingest.offline_nlp import offline_nlp_enabled, use_offline_nlp
from refinery.tasks.ingest.readers import ocr_status
from refinery.tasks.ingest.sources import list_sources, source_digest
from refinery.tasks.ingest.stage import INDEX_FILE, QUARANTINE_FILE, parse_batch, run_ingest

__all__ = [
    "INDEX_FILE",
    "QUARANTINE_FILE",
    "IngestConfig",
    "list_sources",
    "ocr_status",
    "offline_nlp_enabled",
    "parse_batch",
    "run_ingest",
    "source_digest",
    "use_offline_nlp",
]
