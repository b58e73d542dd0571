"""Tasks and their data: the torch-free task registry and rows (`spec`), task types (`types/`:
what each kind of task owns), encoding and batching, read-outs and heads, metrics, and the
outputs of a model over rows.

Nothing is imported here, so that reading one module of the folder stays cheap.
"""
