"""Models, decoding strategies, the DeepSpeed engine builder, the per-worker training loop, checkpoints and model packages."""
