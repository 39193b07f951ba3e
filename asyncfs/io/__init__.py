"""Block backends: the only code that opens or reads the image file (O_RDONLY, never written).

``open_image`` returns a BlockDevice for the filesystem inside an image (io_uring or threads,
O_DIRECT or buffered, a partition or a byte window); ``describe_image`` lists partitions and
the filesystem each holds. The fault injector lives in ``asyncfs.testing``.
"""

from asyncfs.io.device import BlockDevice
from asyncfs.io.image import ImageInfo, PartitionInfo, describe_image
from asyncfs.io.open import DIRECT_MIN, open_image
from asyncfs.io.partition import Partition, PartitionTable, parse_partition_table
from asyncfs.io.threads import ThreadDevice
from asyncfs.io.uring import UringDevice

__all__ = [
    "DIRECT_MIN",
    "BlockDevice",
    "ImageInfo",
    "Partition",
    "PartitionInfo",
    "PartitionTable",
    "ThreadDevice",
    "UringDevice",
    "describe_image",
    "open_image",
    "parse_partition_table",
]
