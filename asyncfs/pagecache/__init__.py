"""Pure page state: flags, hashed wait table, wake rules, eviction, readahead policy (no trio, no I/O)."""
