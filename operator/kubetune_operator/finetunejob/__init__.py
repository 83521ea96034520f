"""FineTuneJob: builders (spec -> manifests), observation of children, and the reconcile."""
