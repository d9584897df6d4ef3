"""Ingest: raw files and datasets to the documents table, with a quarantine for bad input.

The flow calls `source_digest` (skip the stage when nothing changed) and
`run_ingest`; `use_offline_nlp` keeps unstructured's partitioners off the network.
Formats live one per module in `formats/` and are registered in `formats.FORMATS`;
`register_format` / `registered` add one from outside the package.
"""

from refinery.tasks.ingest.base import Format
from refinery.tasks.ingest.config import IngestConfig
from refinery.tasks.ingest.formats import ocr_status, register_format, registered
from refinery.tasks.ingest.offline_nlp import offline_nlp_enabled, use_offline_nlp
from refinery.tasks.ingest.sources import list_sources, source_digest
from refinery.tasks.ingest.stage import INDEX_FILE, QUARANTINE_FILE, parse_batch, run_ingest

__all__ = [
    "INDEX_FILE",
    "QUARANTINE_FILE",
    "Format",
    "IngestConfig",
    "list_sources",
    "ocr_status",
    "offline_nlp_enabled",
    "parse_batch",
    "register_format",
    "registered",
    "run_ingest",
    "source_digest",
    "use_offline_nlp",
]
