"""A high-throughput DICOM ingestion engine: receive, validate, dedupe, write, index."""

__version__ = "0.1.0"
