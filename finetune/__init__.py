"""Fine-tuning, evaluation, calibration and the model registry of driftloop.

This package depends on no other driftloop package: the service and the monitor import it (the
registry, model loading, descriptors), never the other way round.
"""
