"""Data loaders for real data sets and user data."""

from padnet.data.fashion_mnist import FASHION_MNIST_CLASSES, find_fashion_mnist, load_fashion_mnist

__all__ = ["FASHION_MNIST_CLASSES", "find_fashion_mnist", "load_fashion_mnist"]
