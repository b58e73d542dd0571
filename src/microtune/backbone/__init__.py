"""The base model and its map: loading it (packaged, GGUF, hub) and its fingerprints, the
architecture map (`ArchSpec` per model type) and discovery of an undeclared layout.

Nothing is imported here, so that reading one module of the folder stays cheap.
"""
