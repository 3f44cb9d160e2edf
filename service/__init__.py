"""Serving: the BentoML service (batching, hot swap, prediction log writes, feedback, auth).

May import `core` only: the serving image ships `core/` and `service/`, not the trainer or the loop.
"""
