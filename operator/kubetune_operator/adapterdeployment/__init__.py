"""AdapterDeployment: builders (spec -> Deployment, Service, HPA) and the reconcile."""
