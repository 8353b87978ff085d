"""weightrelay's JAX worker (Flax layers, optax SGD). Imports JAX, never torch or TensorFlow."""
