"""Adopting keybrake in existing Argo workflows: `keybrake lint` (lint.py) finds the spend risks."""
