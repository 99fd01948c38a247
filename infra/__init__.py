"""Local services for the pipeline: embedded Postgres, MLflow and Prefect servers, the served deployment."""
