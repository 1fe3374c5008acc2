"""The vault-key proxy: an ASGI app that swaps vault keys for real vendor secrets."""
