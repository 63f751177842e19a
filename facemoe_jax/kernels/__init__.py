"""Hand-written compute kernels the models call: the dropless MoE expert MLP over sorted row blocks."""
