"""Example workflows written with keybrake.hera_workflows; rendered into templates/examples/."""

from __future__ import annotations
