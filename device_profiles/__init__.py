"""Device profiles (one TOML file per device) and their loader: arrives with the planner."""
