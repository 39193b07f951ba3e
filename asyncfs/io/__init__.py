"""Block backends: the only code that opens or reads the image file (O_RDONLY, never written).

``open_image`` returns a BlockDevice for the filesystem inside an image (io_uring or threads,
O_DIRECT or buffered, a partition or a byte window); ``describe_image`` lists partitions and
the filesystem each holds; ``FaultyDevice`` injects latency, EIO and stalls for tests.
"""

from asyncfs.io.device import BlockDevice
from asyncfs.io.faulty import FaultyDevice, parse_latency
from asyncfs.io.image import ImageInfo, PartitionInfo, describe_image
from asyncfs.io.open import DIRECT_MIN, open_image
from asyncfs.io.partition import Partition, PartitionTable, parse_partition_table
from asyncfs.io.threads import ThreadDevice
from asyncfs.io.uring import UringDevice

__all__ = [
    "DIRECT_MIN",
    "BlockDevice",
    "FaultyDevice",
    "ImageInfo",
    "Partition",
    "PartitionInfo",
    "PartitionTable",
    "ThreadDevice",
    "UringDevice",
    "describe_image",
    "open_image",
    "parse_latency",
    "parse_partition_table",
]
