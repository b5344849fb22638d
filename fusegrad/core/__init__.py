"""The bottom layer: Tensor and autograd, the tracer, errors."""
