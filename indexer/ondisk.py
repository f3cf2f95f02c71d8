"""IVF indexes whose inverted lists live in a file of their own, memory-mapped (`index build --on-disk`).

An on-disk index is two files in the index folder: the FAISS file (`index-*.faiss`: the trained
quantizer and, per list, where its codes and ids lie) and the lists file (`lists-*.ivfdata`: every
list's codes and ids, FAISS's `OnDiskInvertedLists`). The manifest names both, with sizes and
checksums, so the one-rename commit of the index folder covers them together.

- Build: the IVF is trained on a sample, then each shard's vectors go into an empty copy of the
  trained index that is written as a part file; the parts are read back memory-mapped
  (`IO_FLAG_MMAP`) and their lists merged into a new lists file (`OnDiskInvertedLists.
  merge_from_multiple`, what `faiss.contrib.ondisk.merge_ondisk` does). Memory: one shard's part.
- Open: the FAISS file is read without its list data (`IO_FLAG_SKIP_IVF_DATA | IO_FLAG_READ_ONLY`)
  and the lists file the manifest names is mapped read-only; a query touches only the lists it
  probes. (FAISS's own `IO_FLAG_MMAP` maps the lists of an ordinary single-file IVF; for an on-disk
  header it skips the data and would leave the lists unmapped, and `IO_FLAG_ONDISK_SAME_DIR` prints
  on stdout, so the lists are mapped here from the path the manifest gives, which keeps the folder
  relocatable.)
- Add: the new vectors go into an in-memory part, and the old lists plus the part are merged into a
  NEW lists file; the committed file is never written in place, so a crash leaves the old version.
- Remove: FAISS would change the mapped lists file in place (and cannot at all when it is mapped
  read-only), which no commit could undo, so removed rows are tombstones applied with an
  IDSelector, as for HNSW, until `index compact` writes new lists without them.

Ids are the IVF's own (no `IndexIDMap2`: an IVF stores its ids in the lists, which is what the merge
copies), i.e. the index folder's stable row ids.
"""

from __future__ import annotations

import ctypes
import logging
import os
import re
import secrets
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from indexer.errors import RetrieveError, faiss_write_error

log = logging.getLogger(__name__)

LISTS_FILE = re.compile(r"^lists-[0-9a-f]{12}\.ivfdata$")
ON_DISK = "on_disk"  # params["lists"] of an index whose lists are in a lists file


def ivf_of(index: faiss.Index) -> Any:
    """The IVF index inside (through id maps and pre-transforms), or None."""
    try:
        return faiss.extract_index_ivf(index)
    except (RuntimeError, TypeError):
        return None


def lists_on_disk(index: faiss.Index) -> Any:
    """The index's `OnDiskInvertedLists`, or None (not an IVF, or its lists are in memory)."""
    ivf = ivf_of(index)
    if ivf is None:
        return None
    lists = faiss.downcast_InvertedLists(ivf.invlists)
    return lists if isinstance(lists, faiss.OnDiskInvertedLists) else None


def check_on_disk(index: faiss.Index, kind: str) -> None:
    """An index whose lists can go on disk: an IVF with ordinary lists (not fast-scan blocks, not IVFPQR)."""
    ivf = ivf_of(index)
    if ivf is None:
        raise RetrieveError(
            f"--on-disk: --kind {kind!r} has no inverted lists; choose ivf, ivfsq, ivfpq or an IVF factory string"
        )
    core = faiss.downcast_index(ivf)
    lists = faiss.downcast_InvertedLists(ivf.invlists)
    if isinstance(core, faiss.IndexIVFPQR) or not isinstance(lists, faiss.ArrayInvertedLists):
        raise RetrieveError(f"--on-disk: --kind {kind!r} keeps its lists in a form FAISS cannot put on disk")


def _set_ntotal(index: faiss.Index, ntotal: int) -> None:
    index.ntotal = ntotal
    ivf = ivf_of(index)
    if ivf is not None:
        ivf.ntotal = ntotal


@contextmanager
def _quiet_c_stdout() -> Iterator[None]:
    """FAISS's on-disk lists print with C `printf` ("resizing FILE to N bytes"); stdout belongs to the front
    ends (JSON output), so it goes to the debug log instead. Process-wide for the moment of a merge."""
    sys.stdout.flush()
    libc = ctypes.CDLL(None)
    saved = os.dup(1)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 1)
        try:
            yield
        finally:
            libc.fflush(None)
            os.dup2(saved, 1)
            os.close(saved)
            sink.seek(0)
            text = sink.read().decode(errors="replace").strip()
            if text:
                log.debug("faiss: %s", text)


def _fsync(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def _merge(index: faiss.Index, sources: list[Any], folder: Path) -> Path:
    """Give the IVF new on-disk lists: a new lists file in `folder` holding every entry of `sources`."""
    ivf = ivf_of(index)
    total = sum(int(s.compute_ntotal()) for s in sources)
    if total == 0:
        raise RetrieveError("--on-disk: no vectors to write into the lists file")
    path = folder / f"lists-{secrets.token_hex(6)}.ivfdata"
    lists: Any = faiss.OnDiskInvertedLists(ivf.nlist, ivf.code_size, str(path))
    pointers = faiss.InvertedListsPtrVector()  # type: ignore[attr-defined]  # in faiss, not in its stubs
    for s in sources:
        pointers.push_back(s)
    try:
        with _quiet_c_stdout():
            ntotal = int(lists.merge_from_multiple(pointers.data(), pointers.size(), False))
        _fsync(path)
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    lists.filename = path.name  # what the FAISS file records; readers map the file the manifest names
    ivf.replace_invlists(lists, True)  # the index owns (and frees) them now; the old lists are freed
    lists.this.disown()
    _set_ntotal(index, ntotal)
    return path


def to_disk(index: faiss.Index, folder: Path) -> Path:
    """Move an IVF's in-memory lists into a new lists file in `folder`; returns its path."""
    return _merge(index, [ivf_of(index).invlists], folder)


def _read_bytes(data: np.ndarray, flags: int) -> faiss.Index:
    reader = faiss.VectorIOReader()
    faiss.copy_array_to_vector(data, reader.data)
    return faiss.read_index(reader, flags)


def empty_copy(index: faiss.Index) -> faiss.Index:
    """The trained index without any entries, lists in memory (whether the original's were on disk or not)."""
    if lists_on_disk(index) is None:  # in memory: a copy emptied (cheap for the trained, empty index it gets)
        copy = faiss.clone_index(index)
        copy.reset()
        return copy
    copy = _read_bytes(faiss.serialize_index(index), faiss.IO_FLAG_SKIP_IVF_DATA)  # the header, not the data
    ivf = ivf_of(copy)
    lists: Any = faiss.ArrayInvertedLists(ivf.nlist, ivf.code_size)
    ivf.replace_invlists(lists, True)
    lists.this.disown()  # the index frees them (Python must not as well)
    _set_ntotal(copy, 0)
    return copy


def fill_on_disk(
    index: faiss.Index, batches: Callable[[], Iterable[tuple[np.ndarray, np.ndarray]]], folder: Path
) -> Path:
    """Add (vectors, ids) batch by batch to a trained, empty IVF, each batch through a part file, then merge
    the parts into a new lists file in `folder` (the caller holds the folder's write lock)."""
    template = faiss.serialize_index(empty_copy(index))
    run = secrets.token_hex(4)
    parts: list[Path] = []
    try:
        for vectors, ids in batches():
            part = _read_bytes(template, 0)
            part.add_with_ids(np.ascontiguousarray(vectors, dtype=np.float32), np.asarray(ids, dtype=np.int64))
            path = folder / f".index-part-{run}-{len(parts):05d}.faiss.tmp"  # a crash leaves it to the next write
            parts.append(path)
            try:
                faiss.write_index(part, str(path))
            except RuntimeError as exc:  # a full or read-only disk
                raise faiss_write_error(exc, path) from None
            del part
        mapped = [faiss.read_index(str(p), faiss.IO_FLAG_MMAP) for p in parts]  # the codes stay in the parts
        return _merge(index, [ivf_of(m).invlists for m in mapped], folder)
    finally:
        for p in parts:
            p.unlink(missing_ok=True)


def add_on_disk(index: faiss.Index, vectors: np.ndarray, ids: np.ndarray, folder: Path) -> Path:
    """Old lists + the new vectors into a new lists file (the committed one is never written in place)."""
    part = empty_copy(index)
    part.add_with_ids(np.ascontiguousarray(vectors, dtype=np.float32), np.asarray(ids, dtype=np.int64))
    return _merge(index, [ivf_of(index).invlists, ivf_of(part).invlists], folder)


def add_vectors(index: faiss.Index, vectors: np.ndarray, ids: np.ndarray, folder: Path) -> None:
    """`add_with_ids`, or for on-disk lists a new lists file in `folder` with the old entries and the new."""
    if lists_on_disk(index) is not None:
        add_on_disk(index, vectors, ids, folder)
    else:
        index.add_with_ids(np.ascontiguousarray(vectors, dtype=np.float32), np.asarray(ids, dtype=np.int64))


READ_FLAGS = faiss.IO_FLAG_SKIP_IVF_DATA | faiss.IO_FLAG_READ_ONLY  # the FAISS file of an on-disk index


def map_lists(index: faiss.Index, lists_path: Path) -> None:
    """Map the lists file (read-only) into an index read with READ_FLAGS; a file of the wrong size is refused
    (mapping past its end would crash the process on the first query)."""
    lists = lists_on_disk(index)
    if lists is None:
        raise RetrieveError(f"{lists_path}: the FAISS file beside it has no on-disk lists; rebuild the index")
    try:
        size = lists_path.stat().st_size
    except OSError:
        raise RetrieveError(f"{lists_path}: lists file missing; rebuild the index") from None
    if size != int(lists.totsize):
        raise RetrieveError(f"{lists_path}: {size} bytes, the FAISS file expects {lists.totsize}; rebuild the index")
    lists.filename = str(lists_path)
    lists.read_only = True
    try:
        lists.do_mmap()
    except RuntimeError as exc:
        raise RetrieveError(f"{lists_path}: cannot map the lists file ({str(exc).splitlines()[0][:120]})") from None
    lists.filename = lists_path.name
    # FAISS starts up to 32 threads per search to touch the probed lists ahead; with the file in the page
    # cache that cost 2 ms a query here (0.6 ms without), so searches fault the pages in themselves
    lists.prefetch_nthread = 0


def lists_bytes(index: faiss.Index) -> int:
    lists = lists_on_disk(index)
    return int(lists.totsize) if lists is not None else 0
