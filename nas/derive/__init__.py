"""From a search run to a trained network: derive the architecture, draw it, retrain it."""
