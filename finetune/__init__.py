"""Training and evaluation: data loading and cleaning, fine-tuning, calibration, evaluation reports,
cross-validation and tuning, and registering the result with its lineage.

May import `core` only.
"""
