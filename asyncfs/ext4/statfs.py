"""``statfs`` numbers exactly as fs/ext4/super.c computes them (ext4_statfs).

The metadata overhead follows ext4_calculate_overhead/count_overhead: a fixed per-group
formula without bigalloc, a cluster bitmap count with it, plus the internal journal. Free
counts are the sums of the group descriptors, as the kernel's percpu counters start.
"""

from __future__ import annotations

from collections.abc import Sequence

from asyncfs.ext4 import features as F
from asyncfs.ext4.dirent import EXT4_NAME_LEN
from asyncfs.ext4.group import GroupDesc, bg_has_super, bg_num_gdb, group_first_block
from asyncfs.ext4.superblock import Superblock
from asyncfs.types import StatFs


def _count_overhead(sb: Superblock, grp: int, gds: Sequence[GroupDesc]) -> int:
    has_super = 1 if bg_has_super(sb, grp) else 0
    if not sb.has_ro_compat(F.RO_COMPAT_BIGALLOC):
        return (
            has_super
            + bg_num_gdb(sb, grp)
            + (sb.s_reserved_gdt_blocks if has_super else 0)
            + sb.inode_table_blocks
            + 2
        )
    bits = sb.cluster_bits
    first = group_first_block(sb, grp)
    last = first + sb.s_blocks_per_group - 1
    used: set[int] = set()
    count = 0
    for i, gd in enumerate(gds):
        for b in (gd.bg_block_bitmap, gd.bg_inode_bitmap):
            if first <= b <= last:
                used.add((b - first) >> bits)
                count += 1
        b = gd.bg_inode_table
        if first <= b and b + sb.inode_table_blocks <= last:
            for j in range(sb.inode_table_blocks):
                used.add((b + j - first) >> bits)
                count += 1
        if i != grp:
            continue
        s = 0
        if bg_has_super(sb, grp):
            used.add(0)
            s = 1
            count += 1
        j = bg_num_gdb(sb, grp)
        if s + j > sb.s_blocks_per_group:
            j = sb.s_blocks_per_group - s
        count += j
        for _ in range(j):
            used.add(s >> bits)
            s += 1
    if not count:
        return 0
    return len(used)


def calculate_overhead(sb: Superblock, gds: Sequence[GroupDesc], journal_blocks: int) -> int:
    """Overhead in clusters (sbi->s_overhead after mount)."""
    if sb.has_ro_compat(F.RO_COMPAT_BIGALLOC) and 0 < sb.s_overhead_clusters <= sb.s_blocks_count:
        return sb.s_overhead_clusters
    overhead = sb.s_first_data_block >> sb.cluster_bits
    for grp in range(sb.groups_count):
        overhead += _count_overhead(sb, grp, gds)
    # EXT4_NUM_B2C rounds the journal up to whole clusters
    ratio = 1 << sb.cluster_bits
    overhead += (journal_blocks + ratio - 1) // ratio
    return overhead


def reserved_clusters(sb: Superblock) -> int:
    """ext4_calculate_resv_clusters: 2% or 4096 clusters, none without extents."""
    if not sb.has_incompat(F.INCOMPAT_EXTENTS):
        return 0
    return min((sb.s_blocks_count >> sb.cluster_bits) // 50, 4096)


def compute_statfs(sb: Superblock, gds: Sequence[GroupDesc], overhead: int) -> StatFs:
    """The StatFs the kernel's ext4_statfs returns for this superblock and descriptors."""
    bits = sb.cluster_bits
    free_clusters = sum(gd.bg_free_blocks_count for gd in gds)
    free_inodes = sum(gd.bg_free_inodes_count for gd in gds)
    bfree = max(free_clusters, 0) << bits
    resv = reserved_clusters(sb) << bits
    r_blocks = sb.s_r_blocks_count
    bavail = bfree - (r_blocks + resv) if bfree >= r_blocks + resv else 0
    return StatFs(
        bsize=sb.block_size,
        frsize=sb.block_size,
        blocks=sb.s_blocks_count - (overhead << bits),
        bfree=bfree,
        bavail=bavail,
        files=sb.s_inodes_count,
        ffree=free_inodes,
        namemax=EXT4_NAME_LEN,
    )
