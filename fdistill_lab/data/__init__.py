"""Datasets. ``digits``: scikit-learn 8x8 digits as an EDM image data set; ``imagenet``: EDM-format image
zips and downsampled-ImageNet npz batches; ``prepare_imagenet``: build the EDM ImageNet-64 zip from an
ImageNet train folder."""
