"""The one exception the building blocks raise for a value Argo or keybrake would reject.

It is raised while the Python builds the workflow, before anything reaches a cluster, and its
message names the argument and an accepted example. It is a `KeybrakeError` (the one tree,
`keybrake.proxy.errors`) and, as before, a `ValueError`.
"""

from __future__ import annotations

from keybrake.proxy.errors import KeybrakeError

__all__ = ["TemplateConfigError"]


class TemplateConfigError(KeybrakeError, ValueError):
    """A building block was given a value that would render a workflow Argo or keybrake rejects."""
