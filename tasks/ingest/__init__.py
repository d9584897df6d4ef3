"""Ingest: raw files and datasets to the documents table, with a quarantine for bad input."""
