"""Observing: monitor passes over windows of the prediction log (Evidently drift tests, realized and
estimated quality), their stored verdicts, reports and Prometheus metrics.

May import `core` only.
"""
