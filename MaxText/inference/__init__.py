"""Generation: sampling strategies and the KV-cache decoder."""
