"""Attacks: the Attack protocol, native FGSM/BIM sweeps, torchattacks/foolbox backends, transfer."""
