"""The only layer that awaits: page-cache read path, wait-entry glue to trio, volume operations."""
