"""Stage logic: plain functions over batches of documents, testable without Prefect."""
