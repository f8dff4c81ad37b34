"""Datasets and transforms: Fashion-MNIST from its IDX files, class-folder trees, timm pass-through."""
from .factory import (TIMM_DATASET_PREFIXES, TRANSFORM_RECIPE_KEYS, ToMode, build_datasets, create_dataset,
                      create_transforms, first_n, num_classes_of)
from .fashion_mnist import (FASHION_MNIST_CLASSES, FASHION_MNIST_DEFAULT_ROOT, FASHION_MNIST_ENV, FashionMNIST,
                            IDXFormatError, load_fashion_mnist, read_idx)
from .folder import IMG_EXTENSIONS, DatasetLayoutError, ImageFolder, ImageLoadError, pil_rgb_loader

__all__ = ['create_dataset', 'create_transforms', 'num_classes_of', 'build_datasets', 'first_n', 'ToMode',
           'TRANSFORM_RECIPE_KEYS',
           'TIMM_DATASET_PREFIXES', 'FashionMNIST', 'IDXFormatError', 'read_idx', 'load_fashion_mnist',
           'FASHION_MNIST_CLASSES', 'FASHION_MNIST_DEFAULT_ROOT', 'FASHION_MNIST_ENV', 'ImageFolder',
           'DatasetLayoutError', 'ImageLoadError', 'pil_rgb_loader', 'IMG_EXTENSIONS']
