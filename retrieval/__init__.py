"""retrieve: content-based image retrieval for liver and abdominal medical images.

Data path: images -> tensors -> vectors -> Parquet -> FAISS index -> results.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("retrieve")  # pyproject.toml holds the one version number
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"
