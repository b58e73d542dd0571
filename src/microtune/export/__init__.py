"""Exports a stock loader reads: the merged model and its check (`merged`), ONNX,
sentence-transformers and peft's LoRA format.

Nothing is imported here, so that reading one module of the folder stays cheap.
"""
