"""The dashboard under /ui/ (see `dashboard.py`)."""
