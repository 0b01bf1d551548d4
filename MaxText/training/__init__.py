"""The training step and loop: state, step, loss, optimizers, divergence guard."""
