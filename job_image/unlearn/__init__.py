"""Machine unlearning job: forget samples from a trained model, audit it, write a new version.

Importing this package must stay cheap and torch-free: the operator imports
``unlearning_contracts.spec`` and ``unlearning_contracts.record`` (the API contracts) without torch.
"""

__version__ = "0.1.0"
