"""Test-only oracles: plain reimplementations of reference behaviour that the
services' optimised code is checked against. Imported by tests only (as `oracles.*`,
tests/ being on the path); they may import the services, never the other way round."""
