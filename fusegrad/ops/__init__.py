"""Differentiable ops: each forward beside its explicit backward."""
