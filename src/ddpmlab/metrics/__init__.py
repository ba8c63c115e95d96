"""Evaluation metrics: the NLL bound in bits/dim and sample metrics through torch-fidelity."""
