"""The seed's triplet fine-tuning: losses, miners, triplet sampling, the training loop, checkpoints."""
