"""Hand-written compute kernels the models call: the dropless MoE expert MLP over sorted row blocks
(grouped_matmul.py) and Winograd F(2x2, 3x3) convolution for inference (winograd.py)."""
