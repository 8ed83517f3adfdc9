"""Training algorithms: one file per method, each a set of pure functions (advantages, losses)."""
