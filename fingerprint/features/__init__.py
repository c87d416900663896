"""What detectors compare: hand-crafted image features (pixels, gradients, SSIM) and learnt embeddings."""
