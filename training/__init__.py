"""Affinity's training side: interaction logs -> evaluated model -> MLflow run and registry."""
