"""Models, decoding strategies and (later) the distributed trainer."""
