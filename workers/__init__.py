"""Worker processes: one model each, started by the supervisor as ``python -m workers``."""
