"""Models, batches, the training loop, its resume state and the T trajectory."""
