"""Differential privacy: the torch-free `DPConfig`, Opacus accounting, per-example gradients and
DP-SGD as a trainer plug-in.

Nothing is imported here, so that reading one module of the folder stays cheap.
"""
