"""Atropos' trajectory REST API: the routes (routes.py), byte-compatible with
atroposlib's server, and the precompressed gzip of /batch replies (batch_gzip.py).

May import services.gateway.trajectory (the state they serve), services.gateway.http
and the web stack; nothing of generation/ or rpc/."""
