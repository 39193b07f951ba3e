"""Image fuzzing for asyncfs: find ext4 structures in a pristine image, forge or flip them, and
walk the damaged image in-process through the Volume API with oracles for every promise of
docs/robustness.md. Shared by the long campaign (``bench/fuzz.py``) and the fuzz tests of
``tests/robust/``, so it lives in bench/ (bench never imports tests).

One module per job: ``cases`` (what a case is, drawing them), ``layout`` (where structures
live, by debugfs), ``damage`` (the damaged image), ``walk`` (the guarded walk of a mounted
Volume), ``oracle`` (running a case, its verdict), ``images`` (pristine images built once),
``corpus`` (case files).

A :class:`Case` is compact and reproducible: the pristine image is named by (preset, profile,
tree seed) and every patch by a *locator* (``inode:/sparse/fragmented``, ``extblk:/x:0``, ...)
plus an offset inside the located structure. Locators are resolved with ``debugfs`` on the
freshly built image, so a saved case survives layout changes, new UUIDs and new checksums.

Oracles, per case (:func:`run_case`):

* mount refuses: an ``ImageError`` (an ``AsyncfsError``) whose message is one line;
* every operation of the walk either answers or raises an ``AsyncfsError``; anything else is a
  bug ("crash");
* every operation finishes within ``op_timeout`` (trio) and the case within ``case_timeout``
  (SIGALRM, for loops that never await): else "hang"; no single trio task step holds the
  event loop for more than ``step_limit`` seconds of CPU (every other request would wait):
  else "stall";
* memory stays bounded: the process's RSS high-water mark rises by less than ``mem_limit``
  during the case (or, with ``trace_memory``, tracemalloc's peak stays below it; 10x slower):
  else "memory";
* every read returns exactly the bytes its file map names (device bytes read straight from the
  image file, inline bytes, zeros for holes), never past the device end, never short before
  EOF: else "bytes";
* every inode whose own structures (inode slot, mapping blocks, data, xattr block) the case
  did not touch looks exactly as in the pristine image (attributes, bytes, link, xattrs,
  names): else "clean".
"""
