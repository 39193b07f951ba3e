"""Thin pyfuse3 adapter: handlers to engine calls and values, one errno table."""
