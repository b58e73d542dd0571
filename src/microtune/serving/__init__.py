"""Serving: one tuned model (`microtune.load`), many tasks on one base in mixed batches
(`load_many`), and the HTTP server with its torch-free settings.

Nothing is imported here, so that reading one module of the folder stays cheap.
"""
