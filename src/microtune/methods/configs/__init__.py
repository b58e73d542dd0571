"""The methods' configs, apart from their layers (as peft keeps each method's `config.py`).

`configs/<name>.py` holds the config of `methods/<name>.py` (with its constants, and the state
record a method keeps beside its tensors: `PaFiState`, `PeerState`). None of them imports torch,
so the command line builds its options from them without loading any model code. Each field's help
text is in its metadata (`dataclasses.fields(cls)[i].metadata["help"]`).
"""
