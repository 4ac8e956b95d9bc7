"""robustcaps: adversarial-robustness evaluation for capsule networks and any PyTorch model.

Python API (the CLI is a thin layer over it)::

    import robustcaps
    adapter = robustcaps.load_model("capsnet-small")        # zoo / built-in / plugin spec
    adapter = robustcaps.adapt(my_module, num_classes=10, input_shape=(1, 28, 28), bounds=(0, 1))
"""

from __future__ import annotations

__version__ = "0.1.0"

from .errors import DataError, ModelLoadError, RobustcapsError  # noqa: E402
from .models.adapter import ModelAdapter, adapt  # noqa: E402

__all__ = [
    "DataError",
    "ModelAdapter",
    "ModelLoadError",
    "RobustcapsError",
    "__version__",
    "adapt",
    "load_model",
]


def load_model(spec: str, **options):
    """Load a model by spec (zoo name, architecture name, ...) as a ModelAdapter."""
    from .models.loading import load_model as _load

    return _load(spec, **options)
