"""weightrelay's PyTorch worker. Imports torch, never TensorFlow."""
