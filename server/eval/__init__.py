"""Evaluation use: benchmark question importers and `dvreward eval` (scoring, summary, report)."""
