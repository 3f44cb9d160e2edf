"""The BentoML inference service of driftloop (serving, batching, prediction log, feedback, hot-swap).

May import `finetune` (registry, model loading) and `monitoring` (prediction log schema, metric
definitions) only.
"""
