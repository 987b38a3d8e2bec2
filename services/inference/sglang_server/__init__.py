"""SGLang servers as shards, over their HTTP API: launching one (process), generation
(stream), the model spec, and the weight loader (loader)."""
