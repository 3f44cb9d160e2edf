"""driftloop: fine-tune, serve, monitor and refine a transformer classifier, in one loop."""

__version__ = "0.1.0"
