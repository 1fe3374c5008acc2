"""Hera building blocks for the vault-key pattern."""
