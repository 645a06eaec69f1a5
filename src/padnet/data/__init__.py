"""Data loaders for real data sets and user data: ``load_dataset(name, ...) -> DatasetSplits``.

Image data: Fashion-MNIST (IDX files), ``.npz`` arrays, image folders. Text data: Rotten Tomatoes,
Pang & Lee polarity, CoNLL-2010 and the user's CSV, TSV or JSON-lines files or Hugging Face data
sets saved to disk, tokenised with a Hugging Face tokenizer. The built-in
corpora are fetched by ``python -m padnet.data.fetch`` (``make data``) and never committed.
"""

from padnet.data.fashion_mnist import FASHION_MNIST_CLASSES, find_fashion_mnist, load_fashion_mnist
from padnet.data.registry import list_datasets, load_dataset
from padnet.data.splits import DatasetSplits, split_indices, subset_indices

__all__ = [
    "FASHION_MNIST_CLASSES", "DatasetSplits", "find_fashion_mnist", "list_datasets",
    "load_dataset", "load_fashion_mnist", "split_indices", "subset_indices",
]
