"""Answering queries: the routing rule, the reference router, the fast engine, vLLM and the HTTP server."""
