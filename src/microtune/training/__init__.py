"""Training: the torch-free `TrainConfig` (`config`), the trainer (`loop`, over the `samplers`,
`steps` and `callbacks` it plugs in, `plugins` from outside, `checkpoints`) and the processes of
a torchrun / accelerate run (`distributed`).

Nothing is imported here, so that reading one module of the folder stays cheap.
"""
