"""The embedded torch engine: continuous batching (engine, batch), the model and its
KV cache (runner, kv_cache), sampling, and the engine as a shard with its weight loader."""
