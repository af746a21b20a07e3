"""Plain library code for imgsim: images, DINOv2, index building. No Dagster imports here."""
