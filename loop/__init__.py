"""Acting: what driftloop does with a monitor pass's verdict.

The controller (APScheduler, leader lease, admin API) runs the monitoring stage's passes and, after
each, the bake check, the retrain policy and maybe a refinement job; the refinement fine-tunes the
champion with the training stage, the gate decides with paired tests, and `core.production` moves
the alias.

May import `core`, `finetune` (the refinement trains) and `monitoring` (passes, verdicts, metrics).
"""
