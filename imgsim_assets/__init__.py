"""imgsim: folders of images → DINOv2 embeddings → an incrementally updated Faiss index, as a Dagster code location."""

__version__ = "0.1.0"
