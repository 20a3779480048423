"""DICOMweb."""
