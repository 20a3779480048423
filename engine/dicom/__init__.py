"""The DICOM network adapters. The only package that imports pynetdicom."""
