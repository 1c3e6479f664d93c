"""The frozen base: loading it offline, its indicator tokens, KV caches and plain decoding."""
