"""Monitoring and the closed loop of driftloop: prediction log, Evidently monitor passes,
Prometheus metrics, the APScheduler controller, policy, gate and audit trail.

May import `finetune` only.
"""
