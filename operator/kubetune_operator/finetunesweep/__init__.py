"""FineTuneSweep: pure builders, the Optuna study rebuilt from the trials, and the reconcile."""
