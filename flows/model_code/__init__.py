"""MLflow "models from code": each file here is what MLflow runs to build a registered model at load time."""
