"""Where the inputs come from: backbones by name, the token rules of any LLM family, images and
their sources, WebDataset shards, the synthetic demo data and its LLMs."""
