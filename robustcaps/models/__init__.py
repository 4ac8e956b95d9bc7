"""Models: EM-routing capsule network, baseline CNN, zoo, and the common adapter."""

# Importing the built-in architectures runs their @register_model decorators.
from . import capsnet, cnn  # noqa: F401
from .adapter import ModelAdapter, adapt
from .registry import architectures, create_model, register_model

__all__ = ["ModelAdapter", "adapt", "architectures", "create_model", "register_model"]
