"""The model registry: where MLflow keeps runs and registered models, for training and serving."""
