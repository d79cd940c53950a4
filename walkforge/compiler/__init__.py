"""walkforge compiler."""
