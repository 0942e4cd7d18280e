"""What the CLI does besides running the daemon: oneshot (one-off reads and writes)."""
