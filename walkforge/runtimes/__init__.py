"""walkforge runtimes."""
