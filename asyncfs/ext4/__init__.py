"""Pure ext2/3/4 decoder: bytes in, structures out; no trio, no file I/O."""
