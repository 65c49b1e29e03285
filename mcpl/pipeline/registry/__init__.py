"""The concept registry: learned concepts as versioned MLflow registered models."""
