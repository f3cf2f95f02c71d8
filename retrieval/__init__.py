"""retrieve: content-based image retrieval for liver and abdominal medical images.

Data path: images -> tensors -> vectors -> Parquet -> FAISS index -> results.
"""

__version__ = "0.1.0"
