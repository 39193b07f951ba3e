"""Composition root: command line, options, daemon lifecycle, stats channel, wiring."""
