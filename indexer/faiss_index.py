"""FAISS indexes over cosine similarity (inner product on L2-normalised vectors).

`--kind` is a named kind (flat, hnsw, ivf, ivfpq, auto: see indexer/kinds.py), each a shorthand for a
`faiss.index_factory` string, or any factory string itself ("OPQ64,IVF4096,PQ64", "PCA256,HNSW32").
Results are stable 64-bit row ids: IVF indexes hold ids natively, every other index is wrapped in
`IndexIDMap2`. Indexes that cannot remove vectors (HNSW and anything built on it) get removals as a
tombstone set applied with an IDSelector until `index compact`.

GPU (faiss-gpu, the `[gpu]` extra): IVF k-means is trained on all GPUs, and flat and IVF indexes are
copied to all GPUs for search; everything else, and every machine without a GPU, searches on the CPU.
`search_device` says where an opened index searches.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from indexer.atomic import atomic_path
from indexer.config import IndexConfig
from indexer.errors import RetrieveError, faiss_write_error
from indexer.kinds import FLAT_MAX, HNSW_MAX, KINDS, REFINE, choose_kind, is_named, register_kind, resolve
from indexer.ondisk import ON_DISK, READ_FLAGS, check_on_disk, fill_on_disk, ivf_of, map_lists

log = logging.getLogger(__name__)

__all__ = [
    "FLAT_MAX",
    "HNSW_MAX",
    "INDEX_KINDS",
    "build_index",
    "check_kind",
    "check_on_disk_kind",
    "choose_kind",
    "register_kind",
    "search_device",
]

INDEX_KINDS = KINDS  # the named kinds (shorthands for factory strings)
# FAISS's Python objects take no new attributes, so these hold the index itself (which also keeps its id unique)
_TRAIN_ON_GPU: dict[int, faiss.Index] = {}  # new indexes whose IVF k-means runs on the GPUs
_CPU_TWINS: dict[int, tuple[faiss.Index, faiss.Index]] = {}  # id(GPU index) -> (GPU index, its CPU original)
_LISTS_ON_DISK: dict[int, faiss.Index] = {}  # new indexes whose lists go into a lists file (indexer/ondisk.py)
CHECK_DIM = 1280  # the dimension a factory string is checked against when the vectors' is not known yet


def _faiss_message(exc: BaseException) -> str:
    """The useful part of a FAISS C++ error: after 'failed: ' or the last ': ' of its first line."""
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    for marker in ("failed: ", "Error: "):
        if marker in text:
            return text.split(marker, 1)[1].strip()[:160]
    return text.rsplit(": ", 1)[-1].strip()[:160]


def _factory(dim: int, factory: str, kind: str, dim_known: bool = True) -> faiss.Index:
    """index_factory with the inner-product metric; a string FAISS rejects is a one-line error (naming the
    vectors' dimension where it is theirs, not `check_kind`'s stand-in)."""
    if REFINE.search(factory):
        raise RetrieveError(f"--kind {kind!r}: refinement stages (RFlat, Refine(...)) are not supported here")
    try:
        index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    except (RuntimeError, TypeError, ValueError) as exc:
        for_dim = f" for {dim}-d vectors" if dim_known else ""
        raise RetrieveError(f"--kind {kind!r}: FAISS rejects it{for_dim} ({_faiss_message(exc)})") from None
    if index.metric_type != faiss.METRIC_INNER_PRODUCT:
        raise RetrieveError(f"--kind {kind!r}: this index ignores the inner-product metric (cosine); choose another")
    if isinstance(index, faiss.IndexBinary):
        raise RetrieveError(f"--kind {kind!r}: binary indexes are not supported")
    return index


def check_kind(kind: str, dim: int | None = None) -> str:
    """Check a --kind before any expensive work: a named kind, or a factory string FAISS accepts."""
    kind = kind.strip()
    if not kind:
        raise RetrieveError(f"--kind: empty; choose auto, {', '.join(KINDS)} or a faiss.index_factory string")
    if not is_named(kind):
        try:
            _factory(dim or CHECK_DIM, kind, kind, dim_known=dim is not None)
        except RetrieveError as exc:
            # without the vectors' dimension only a string FAISS cannot parse is certainly wrong
            if dim is not None or "could not parse" in str(exc) or "refinement" in str(exc):
                raise
    return kind


def check_on_disk_kind(kind: str) -> None:
    """`--on-disk` before any expensive work: the kind must be an IVF whose lists FAISS can put on disk."""
    name = "ivfsq" if kind == "auto" else kind
    factory = KINDS[name](CHECK_DIM, FLAT_MAX, IndexConfig())[0] if is_named(name) else name
    try:
        index = _factory(CHECK_DIM, factory, kind)
    except RetrieveError:
        return  # depends on the vectors' dimension: `new_index` checks again with it
    check_on_disk(index, kind)


def _hnsw_of(index: faiss.Index) -> Any:
    index = faiss.downcast_index(index)
    while isinstance(index, (faiss.IndexIDMap, faiss.IndexPreTransform)):
        index = faiss.downcast_index(index.index)
    return index if isinstance(index, faiss.IndexHNSW) else None


def _can_remove(index: faiss.Index) -> bool:
    try:
        index.remove_ids(faiss.IDSelectorBatch(np.zeros(0, dtype=np.int64)))
        return True
    except RuntimeError:
        return False


def _apply_params(index: faiss.Index, params: dict[str, Any]) -> None:
    """Search settings from the manifest onto the index object (a tuned ParameterSpace string, nprobe, efSearch)."""
    spec = params.get("search_params")
    if spec:
        try:
            space: Any = faiss.ParameterSpace()  # the stubs know only the (int, double) overload
            space.set_index_parameters(index, str(spec))
        except RuntimeError as exc:
            log.warning("search parameters %r not applied (%s)", spec, _faiss_message(exc))
    ivf = ivf_of(index)
    if ivf is not None and "nprobe" in params:
        ivf.nprobe = min(int(params["nprobe"]), ivf.nlist)
    hnsw = _hnsw_of(index)
    if hnsw is not None and "ef_search" in params:
        hnsw.hnsw.efSearch = int(params["ef_search"])


def new_index(dim: int, n: int, kind: str, cfg: IndexConfig, use_gpu: bool) -> tuple[faiss.Index, str, dict[str, Any]]:
    """An empty CPU index of the kind (`auto` resolved for n vectors), keyed by 64-bit ids; (index, kind, params).

    `use_gpu` trains IVF k-means on the GPUs when there are any (see `fill_index`). `cfg.on_disk` (IVF kinds;
    `auto` means ivfsq then) keeps the lists in a lists file, removals as tombstones (indexer/ondisk.py).
    """
    on_disk = cfg.on_disk
    kind = "ivfsq" if on_disk and kind == "auto" else kind
    resolved, factory, params = resolve(check_kind(kind), dim, n, cfg)
    index = _factory(dim, factory, kind)
    if on_disk:
        check_on_disk(index, kind)
    if ivf_of(index) is None:
        index = faiss.IndexIDMap2(index)
    params = {"factory": factory, **params}
    _apply_params(index, params)
    params["built_on"] = "gpu" if use_gpu and gpu_count() > 0 and ivf_of(index) is not None else "cpu"
    if params["built_on"] == "gpu":
        _TRAIN_ON_GPU[id(index)] = index  # read by fill_index (streaming builds call it without use_gpu)
    params["removal"] = "faiss" if _can_remove(index) else "tombstone"
    if on_disk:  # FAISS would remove by rewriting the committed lists file in place: tombstones until compact
        params["lists"], params["removal"] = ON_DISK, "tombstone"
        _LISTS_ON_DISK[id(index)] = index
    return index, resolved, params


def _train(index: faiss.Index, x: np.ndarray, on_gpu: bool) -> None:
    ivf = ivf_of(index)
    gpu_quantizer = None
    if on_gpu and ivf is not None and gpu_count() > 0:
        try:  # k-means assignment on all GPUs: the costly part of training an IVF index
            gpu_quantizer = faiss.index_cpu_to_all_gpus(faiss.IndexFlatIP(ivf.d))
            ivf.clustering_index = gpu_quantizer
        except RuntimeError as exc:
            log.info("training on CPU, the GPU refused (%s)", _faiss_message(exc))
    try:
        index.train(x)
    except RuntimeError as exc:
        raise RetrieveError(f"FAISS could not train this index on {len(x)} vectors ({_faiss_message(exc)})") from None
    finally:
        if gpu_quantizer is not None and ivf is not None:
            ivf.clustering_index = None


def fill_index(
    index: faiss.Index,
    batches: Callable[[], Iterable[tuple[np.ndarray, np.ndarray]]],
    sample: Callable[[], np.ndarray] | None = None,
    use_gpu: bool | None = None,
    folder: Path | None = None,
) -> None:
    """Train on `sample()` when the kind needs it (IVF k-means on the GPUs where `new_index` chose them),
    then add (vectors, ids) batch by batch. An index `new_index` made for on-disk lists, given the index
    `folder` (whose write lock the caller holds), is filled through part files merged into a lists file there."""
    planned_gpu = _TRAIN_ON_GPU.pop(id(index), None) is not None  # taken first: a failed training keeps no index
    on_disk = _LISTS_ON_DISK.pop(id(index), None) is not None  # alive in these tables
    if not index.is_trained:
        if sample is None:
            raise ValueError("this index kind needs training vectors")
        _train(index, np.ascontiguousarray(sample(), dtype=np.float32), planned_gpu if use_gpu is None else use_gpu)
    if on_disk and folder is not None:
        fill_on_disk(index, batches, folder)
        return
    for vectors, ids in batches():
        index.add_with_ids(np.ascontiguousarray(vectors, dtype=np.float32), np.asarray(ids, dtype=np.int64))


def build_index(
    vectors: np.ndarray, kind: str, cfg: IndexConfig, use_gpu: bool, ids: np.ndarray | None = None
) -> tuple[faiss.Index, str, dict[str, Any]]:
    """Train (when the kind needs it) and fill an index; returns (index, resolved kind, parameters)."""
    n, dim = vectors.shape
    index, resolved, params = new_index(dim, n, kind, cfg, use_gpu)
    x = np.ascontiguousarray(vectors, dtype=np.float32)
    keys = np.arange(n, dtype=np.int64) if ids is None else np.asarray(ids, dtype=np.int64)
    fill_index(index, lambda: [(x, keys)], sample=lambda: x, use_gpu=use_gpu)
    return index, resolved, params


def inner(index: faiss.Index) -> faiss.Index:
    """The index inside an id map (the kind's own index)."""
    return faiss.downcast_index(index.index) if isinstance(index, faiss.IndexIDMap) else index


def has_ids(index: faiss.Index) -> bool:
    """Whether search results are stable ids (format 2) rather than row positions (format 1)."""
    index = faiss.downcast_index(index)
    return isinstance(index, faiss.IndexIDMap) or ivf_of(index) is not None or "Gpu" in type(index).__name__


def _level_parameters(index: faiss.Index, k: int, params: dict[str, Any]) -> Any:
    """SearchParameters of the type the innermost searching index expects (FAISS checks the type)."""
    index = faiss.downcast_index(index)
    if isinstance(index, (faiss.IndexIDMap, faiss.IndexPreTransform)):  # both pass parameters through
        return _level_parameters(index.index, k, params)
    if isinstance(index, faiss.IndexIVF):
        sp = faiss.SearchParametersIVF()
        sp.nprobe = min(int(params.get("nprobe", index.nprobe)), index.nlist)
        sp.max_codes = index.max_codes
        return sp
    if isinstance(index, faiss.IndexHNSW):
        sp = faiss.SearchParametersHNSW()  # type: ignore[attr-defined]  # in faiss, not in its stubs
        sp.efSearch = max(int(params.get("ef_search", index.hnsw.efSearch)), k)
        return sp
    if isinstance(index, faiss.IndexPQ):
        sp = faiss.SearchParametersPQ()  # type: ignore[attr-defined]
        pq: Any = index
        sp.search_type, sp.polysemous_ht = pq.search_type, pq.polysemous_ht
        return sp
    return faiss.SearchParameters()


def search_parameters(index: faiss.Index, k: int, params: dict[str, Any], selector: Any = None) -> Any:
    """SearchParameters for the index: search depth at least k, and an IDSelector restricting candidates."""
    sp = _level_parameters(index, k, params)
    if selector is not None:
        sp.sel = selector
    return sp


# --- GPU ------------------------------------------------------------------------------------------


FAISS_DISTRIBUTIONS = ("faiss-cpu", "faiss-gpu", "faiss-gpu-cu12", "faiss-gpu-cu11")
_warned_install = False


def faiss_install_problem(installed: Iterable[str] | None = None) -> str | None:
    """A warning when faiss-cpu and a GPU build are both installed: they overwrite one `faiss` module."""
    if installed is None:
        from importlib.metadata import PackageNotFoundError, version

        installed = []
        for name in FAISS_DISTRIBUTIONS:
            try:
                version(name)
                installed.append(name)
            except PackageNotFoundError:
                pass
    names = list(installed)
    if "faiss-cpu" in names and len(names) > 1:
        return (
            f"{' and '.join(names)} are installed together and share one `faiss` module; keep one: "
            "pip uninstall -y faiss-cpu faiss-gpu && pip install --no-deps faiss-gpu==1.15.1"
        )
    return None


def gpu_count() -> int:
    """GPUs FAISS can use: 0 with faiss-cpu, or where no CUDA device is visible."""
    global _warned_install
    if not _warned_install:
        _warned_install = True
        problem = faiss_install_problem()
        if problem:
            log.warning("%s", problem)
    try:
        return int(faiss.get_num_gpus()) if hasattr(faiss, "get_num_gpus") else 0
    except RuntimeError:
        return 0


def gpu_capable(index: faiss.Index) -> bool:
    """Flat and IVF indexes (possibly in an id map) have GPU versions; HNSW and pre-transforms do not."""
    core = faiss.downcast_index(index)
    if isinstance(core, faiss.IndexIDMap):
        core = faiss.downcast_index(core.index)
    return isinstance(core, (faiss.IndexFlat, faiss.IndexIVFFlat, faiss.IndexIVFPQ, faiss.IndexIVFScalarQuantizer))


def planned_search_device(params: dict[str, Any], dim: int, use_gpu: bool = True) -> str:
    """Where a query would search this index (from its manifest, without loading it): "cpu" or "gpu:0,1"."""
    gpus = gpu_count() if use_gpu else 0
    factory = params.get("factory")
    if gpus == 0 or not factory or params.get("lists") == ON_DISK:  # on-disk lists are searched where they lie
        return "cpu"
    try:
        index = faiss.index_factory(dim, str(factory), faiss.METRIC_INNER_PRODUCT)
    except RuntimeError:
        return "cpu"
    if ivf_of(index) is None:
        index = faiss.IndexIDMap2(index)
    return "gpu:" + ",".join(str(g) for g in range(gpus)) if gpu_capable(index) else "cpu"


def to_gpu(index: faiss.Index) -> faiss.Index:
    """A copy of the index on all GPUs (replicated), or the index itself when it has no GPU version."""
    if not gpu_capable(index) or gpu_count() == 0:
        return index
    return faiss.index_cpu_to_all_gpus(index)


def cpu_twin(index: faiss.Index) -> faiss.Index:
    """The CPU original of an index `load_index` put on the GPUs (the index itself otherwise)."""
    pair = _CPU_TWINS.get(id(index))
    return pair[1] if pair is not None and pair[0] is index else index


def to_cpu(index: faiss.Index) -> faiss.Index:
    if hasattr(faiss, "index_gpu_to_cpu") and search_device(index) != "cpu":
        return faiss.index_gpu_to_cpu(index)
    return index


def search_device(index_: faiss.Index) -> str:
    """Where the index searches: "cpu", or "gpu:N" (GPU N), "gpu:0,1" (replicas on GPUs 0 and 1)."""
    index: Any = faiss.downcast_index(index_)
    name = type(index).__name__
    if isinstance(index, faiss.IndexIDMap):
        return search_device(index.index)
    if name in ("IndexReplicas", "IndexShards") and index.count():
        devices = [search_device(index.at(i)) for i in range(index.count())]
        gpus = [d.split(":", 1)[1] for d in devices if d.startswith("gpu:")]
        return "gpu:" + ",".join(gpus) if gpus else "cpu"
    if name.startswith("Gpu"):
        return f"gpu:{index.getDevice()}"
    return "cpu"


def save_index(index: faiss.Index, path: Path) -> None:
    with atomic_path(path) as tmp:
        try:
            faiss.write_index(to_cpu(index), str(tmp))
        except RuntimeError as exc:  # FAISS's word for a full or read-only disk
            raise faiss_write_error(exc, path) from None


def load_index(
    path: Path, use_gpu: bool, mmap: bool = False, params: dict[str, Any] | None = None, lists: Path | None = None
) -> faiss.Index:
    """Read an index file, with the manifest's search settings applied.

    `lists`: the lists file of an on-disk IVF (indexer/ondisk.py), mapped read-only for readers and writers
    alike (writers never change it in place); such an index stays on the CPU.

    With `mmap` (readers on the CPU) the vectors stay in the file, memory-mapped, so opening costs no time
    or memory whatever the size (a writer needs `mmap=False` to change it). With `use_gpu` and a GPU,
    flat and IVF indexes are copied to all GPUs for search.
    """
    if not path.is_file():
        raise RetrieveError(f"{path}: FAISS index file not found")
    on_gpu = use_gpu and gpu_count() > 0 and lists is None
    flags = READ_FLAGS if lists is not None else faiss.IO_FLAG_MMAP_IFC if mmap else 0
    try:
        index = faiss.read_index(str(path), flags)
    except RuntimeError as exc:
        raise RetrieveError(f"{path}: not a readable FAISS index ({str(exc).splitlines()[0][:120]})") from None
    if lists is not None:
        map_lists(index, lists)
    if params:
        _apply_params(index, params)
    if on_gpu:
        try:
            gpu_index = to_gpu(index)
            if gpu_index is not index:  # filtered searches run on the CPU original: GPU indexes take no IDSelector
                _CPU_TWINS[id(gpu_index)] = (gpu_index, index)
            index = gpu_index
        except RuntimeError as exc:  # e.g. an index type without GPU support
            log.info("searching on CPU, the GPU refused this index (%s)", _faiss_message(exc))
    return index
