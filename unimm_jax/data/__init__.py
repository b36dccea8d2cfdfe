"""Input pipelines, free of networks.

Images: sources (sources.py), transforms (transforms.py), builtin and synthetic images
(builtin_images.py), config fields (data_config.py), and the grain train iterator and eval
images the trainer uses (pipeline.py).
Text: corpora (text_corpus.py), tokenizers (text_tokenizer.py, scene_tokenizer.py), config
fields (text_data_config.py), and the one resumable packer (text_packing.py).
Image-text conversations: the built-in procedural scenes (scenes.py,
scene_conversations.py), LLaVA-NeXT any-res tiles (anyres.py), Chameleon-style sequences
with image slots and loss masks (mllm_sequence.py), and their config, sources and packed
iterators (mllm_data_config.py, mllm_data.py).
"""
