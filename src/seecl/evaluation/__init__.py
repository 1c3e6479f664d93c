"""Metrics, the stage-by-task evaluation protocol and reports."""
