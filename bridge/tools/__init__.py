"""What the CLI does besides running the daemon: oneshot (one-off reads from a URL, and the
URL grammar), points (one-off reads and writes through points), plan, and the commissioning
tools (scan, identify, probe)."""
