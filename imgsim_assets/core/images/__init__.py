"""Image files → uint8 tensors. Every file handed to :func:`preprocess_file` comes back as exactly
one :class:`ImageRecord`: ``ok`` with its pixels, or ``rejected`` with a reason and a message."""

from imgsim_assets.core.images.decoding import ORIENTATION_TAG, decode, decode_pixels
from imgsim_assets.core.images.listing import (
    fingerprint_folder, fingerprint_folders, folder_fingerprint, list_batch_files, list_batch_paths,
)  # fmt: skip
from imgsim_assets.core.images.names import (
    DONE_MARKER, as_text, image_id_from_sha256, os_path, record_path, source_path,
)  # fmt: skip
from imgsim_assets.core.images.metadata import PhotoMetadata, photo_metadata
from imgsim_assets.core.images.pool import decode_pool, default_workers, preprocess_files, shutdown_decode_pool
from imgsim_assets.core.images.preprocess import preprocess_file
from imgsim_assets.core.images.protocol import (
    MIN_BOX_SIDE, PATCH_SIZE, BadBox, Box, Preprocess, source_box,
)  # fmt: skip
from imgsim_assets.core.images.reading import read_file, read_file_stat
from imgsim_assets.core.images.reasons import (
    CHANGED_WHILE_READING, DECODE_ERROR, DECOMPRESSION_BOMB, EMPTY_FILE, NOT_A_FILE, NOT_AN_IMAGE, OUTSIDE_ROOT,
    REASONS, TOO_LARGE, TOO_SMALL, TRUNCATED, UNREADABLE, UNSUPPORTED_MODE, Rejected,
)  # fmt: skip
from imgsim_assets.core.images.records import OK, REJECTED, ImageRecord, records_to_columns

__all__ = [
    "MIN_BOX_SIDE", "BadBox", "Box", "source_box",
    "CHANGED_WHILE_READING", "DECODE_ERROR", "DECOMPRESSION_BOMB", "DONE_MARKER", "EMPTY_FILE", "NOT_AN_IMAGE",
    "NOT_A_FILE", "OK", "ORIENTATION_TAG", "OUTSIDE_ROOT", "PATCH_SIZE", "REASONS", "REJECTED", "TOO_LARGE",
    "TOO_SMALL", "TRUNCATED", "UNREADABLE", "UNSUPPORTED_MODE", "ImageRecord", "PhotoMetadata", "Preprocess",
    "Rejected", "as_text",
    "decode", "decode_pixels", "decode_pool", "default_workers", "fingerprint_folder", "fingerprint_folders",
    "folder_fingerprint", "image_id_from_sha256",
    "list_batch_files", "list_batch_paths", "os_path", "photo_metadata", "preprocess_file", "preprocess_files", "read_file", "read_file_stat", "record_path",
    "records_to_columns", "shutdown_decode_pool", "source_path",
]  # fmt: skip
