"""A user's own Flower app with its own model, switched to sample selection."""
