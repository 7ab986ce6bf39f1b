"""Register stage: export a trained model, add it to the MLflow registry and apply the promotion policy."""
