"""Datasets: smallNORB format, SynthNORB renderer, MNIST idx, npz, paper preprocessing.

``load_dataset(name, split, ...)`` returns a :class:`Dataset` in the model's input space; see
:mod:`robustcaps.data.datasets`.
"""

from .datasets import Dataset, load_dataset

__all__ = ["Dataset", "load_dataset"]
