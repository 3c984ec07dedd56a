"""The torch side: the Optimizer, its state store and routing of parameters."""
