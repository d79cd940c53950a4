"""walkforge artifacts."""
