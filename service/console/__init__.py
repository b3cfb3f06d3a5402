"""The operations console: server-rendered web pages over the same settings, event store, MLflow
registry and gRPC API the rest of Affinity uses (``affinity console``, docs/console.md).

:mod:`service.console.app` builds the application, :mod:`service.console.cli` serves it."""
