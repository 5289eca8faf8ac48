"""One module per pipeline stage; each exposes a config dataclass and `run(cfg)`."""
