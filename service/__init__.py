"""Affinity's gRPC serving side: loads the champion model from the registry and answers requests."""
