"""Image input pipelines: sources (sources.py), transforms (transforms.py), builtin and
synthetic images (builtin_images.py), config fields (data_config.py), and the grain train
iterator and eval images the trainer uses (pipeline.py)."""
