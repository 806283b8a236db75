"""dvlx: train and evaluate Dream-VL and Dream-VLA with PyTorch Lightning."""

__version__ = "0.1.0"
