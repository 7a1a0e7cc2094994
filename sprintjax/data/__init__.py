"""Training data: ArrayRecord datasets described by a TFDS builder, read through grain."""
