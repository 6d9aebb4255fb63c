"""Accuracy harness: benchmark tasks with fixed splits, and scoring through the compiled engine."""
