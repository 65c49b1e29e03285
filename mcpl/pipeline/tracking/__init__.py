"""MLflow tracking that never loses a training result (spool and replay)."""
