"""Models: EM-routing capsule network, baseline CNN, zoo, and the common adapter."""

from .adapter import ModelAdapter, adapt
from .registry import architectures, create_model, register_model

__all__ = ["ModelAdapter", "adapt", "architectures", "create_model", "register_model"]
