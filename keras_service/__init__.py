"""weightrelay's Keras (TensorFlow backend) worker. Imports TensorFlow, never torch."""
