"""Orchestration: the Prefect pipeline flow, typed config, CLI and lineage logging."""
