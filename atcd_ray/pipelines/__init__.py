"""FFCV's .beton writers: ``python -m atcd_ray.pipelines.write``. The loaders that read them are
``atcd_ray.data.ffcv_batches``, beside the other loaders; a run with ``data.ffcv_dir`` set and
FFCV missing is an error, never a silent fallback to loaders that augment otherwise."""
