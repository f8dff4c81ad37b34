"""Datasets and transforms: Fashion-MNIST from its IDX files, class-folder trees, timm pass-through, and the dense
(detection / segmentation) dataset generator and readers."""
from .dense import CocoInstances, SemanticMaps, dense_collate, load_coco
from .dense_synth import (DENSE_TINY_PRESET, add_make_dense_arguments, is_dense_dataset, load_dense_source,
                          make_dense_dataset, render_dense_image, run_make_dense)
from .factory import (TIMM_DATASET_PREFIXES, TRANSFORM_RECIPE_KEYS, ToMode, build_datasets, create_dataset,
                      create_transforms, first_n, num_classes_of)
from .fashion_mnist import (FASHION_MNIST_CLASSES, FASHION_MNIST_DEFAULT_ROOT, FASHION_MNIST_ENV, FashionMNIST,
                            IDXFormatError, load_fashion_mnist, read_idx)
from .folder import IMG_EXTENSIONS, DatasetLayoutError, ImageFolder, ImageLoadError, pil_rgb_loader

__all__ = ['create_dataset', 'create_transforms', 'num_classes_of', 'build_datasets', 'first_n', 'ToMode',
           'TRANSFORM_RECIPE_KEYS',
           'TIMM_DATASET_PREFIXES', 'FashionMNIST', 'IDXFormatError', 'read_idx', 'load_fashion_mnist',
           'FASHION_MNIST_CLASSES', 'FASHION_MNIST_DEFAULT_ROOT', 'FASHION_MNIST_ENV', 'ImageFolder',
           'DatasetLayoutError', 'ImageLoadError', 'pil_rgb_loader', 'IMG_EXTENSIONS',
           'CocoInstances', 'SemanticMaps', 'dense_collate', 'load_coco', 'make_dense_dataset', 'render_dense_image',
           'load_dense_source', 'add_make_dense_arguments', 'run_make_dense', 'is_dense_dataset', 'DENSE_TINY_PRESET']
