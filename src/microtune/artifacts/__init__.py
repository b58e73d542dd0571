"""Artifacts: safetensors + JSON, saved and loaded (`store`), their one schema, the rules of
output folders, and pushing an artifact to the hub.

Nothing is imported here, so that reading one module of the folder stays cheap.
"""
