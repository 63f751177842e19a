"""Conversion and loading: PyTorch twins, torch <-> JAX state_dicts, ONNX writing and
`load_variables` (load.py), which turns any path holding a face model into its variables."""
