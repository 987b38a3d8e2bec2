"""Generated clotho.v1 stubs (scripts/gen_protos.py). Do not edit."""
