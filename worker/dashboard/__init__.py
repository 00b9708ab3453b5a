"""The web dashboard every agent serves on ``[http] listen`` (docs/dashboard.md)."""

from __future__ import annotations

from worker.dashboard.app import Dashboard
from worker.dashboard.recorder import Recorder

__all__ = ["Dashboard", "Recorder"]
