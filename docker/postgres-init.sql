-- Prefect uses the database created by POSTGRES_DB; MLflow gets its own.
CREATE DATABASE mlflow;
