"""Benchmark harness (issue 6): asyncfs against fuse2fs, the kernel loop mount and raw fio.

``bench/run.py`` is the one command; ``targets`` mounts things, ``workloads`` runs fio and the
small-file walk, ``image`` builds the benchmark image, ``report`` (pure) parses fio output and
computes the ratio tables, ``plots`` draws the PNGs. Other helpers may add ``engine_*``/``io_*``
micro-benchmarks beside these.
"""
