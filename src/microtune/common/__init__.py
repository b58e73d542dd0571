"""Common ground, free of torch: the names users choose, shared checks, the strict record
type, file names and atomic writes, an export folder's file hashes, and fetching from the
Hugging Face hub.

Nothing is imported here, so that reading one module of the folder stays cheap.
"""
