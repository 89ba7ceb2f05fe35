"""Tokenwise trainer: processes, engines, checkpoints, logging and the CLI (`tokenwise`, `python -m tokenwise.trainer`)."""
