"""FFCV pipelines: ``.beton`` writers (``python -m atcd_ray.pipelines.write``) and loaders that
yield the same (float images in [0, 1], labels) batches as ``atcd_ray.data``. FFCV is optional:
``atcd_ray.data`` falls back to its torchvision loaders, with a log line, when it is missing."""
