"""Text sources, tokenizer training, shard writing and streaming."""
