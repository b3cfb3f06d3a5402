"""Affinity's pure model layer: algorithms, id maps, the artifact format and ranking metrics.

Both ``training`` and ``service`` import this package; it imports neither, and never touches MLflow
or the network.
"""

from __future__ import annotations

FORMAT_VERSION = 1
"""Version of the on-disk artifact format written by :mod:`models.artifact`."""
