"""Losses: one file per task, combined by :class:`MultiTaskLoss` (task balancing lives in balance.py)."""
