"""Upstream fakes for what cannot run here, written to the vendors' documented behaviour."""
