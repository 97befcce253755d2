"""jaxllama.kernels: attention and scan kernels. Never imports the model."""
