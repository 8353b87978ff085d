"""weightrelay's coordinator: relays weights between workers and records what each framework does.

Imports neither torch nor TensorFlow: it speaks to the workers over gRPC only.
"""
