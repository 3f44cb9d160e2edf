"""What every stage of driftloop stands on and talks through.

The state DB and home, errors and tokens; the model registry (BentoML's model store), the production
alias and the one function that moves it, the audit trail; the datasets models were trained on; the
prediction log with every query on it; and the model itself (loading, inference, descriptors,
reference profile), shared by training and serving.

Imports no other driftloop package: every stage imports it, it imports none of them.
"""
