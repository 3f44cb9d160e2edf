"""driftloop: fine-tune, serve, monitor and refine a transformer classifier, in one loop.

This package is the `driftloop` command and the operator's tools (`up`, `demo`, `replay`, child
processes); it may import every stage.
"""

__version__ = "0.1.0"
