"""asyncfs: read-only FUSE mounts of ext2/3/4 images through a kernel-style async page cache."""

__version__ = "0.1.0"
