"""Datasets: smallNORB format, SynthNORB renderer, MNIST idx, npz, paper preprocessing."""
