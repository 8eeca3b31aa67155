"""The networks: pure architecture, each built from its config with an ``operations`` namespace."""
