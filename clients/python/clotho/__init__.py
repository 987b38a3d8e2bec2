"""Python client for the Clotho mesh: generated clotho.v1 stubs plus a small client."""
