"""Examples of user extension points (e.g. task metrics for `evaluate.metrics`)."""
