"""The evaluate stage: metrics, baselines, batch inference and the report.

Plain functions only; nothing here imports Prefect or Ray at module level, so the metrics can be
used from a notebook or a test without starting either.
"""
