"""
The configuration of a Stage-1 VLM exported for transformers (`sample.py --export_hf`): the
frozen vision tower's and LLM's own configs in full, the connector's sizes, and how images
become slots. Self-contained: transformers only.
"""
from transformers import AutoConfig, PretrainedConfig


class Stage1VLMConfig(PretrainedConfig):
    model_type = 'stage1_vlm'
    sub_configs = {'vision_config': AutoConfig, 'text_config': AutoConfig}

    def __init__(self, vision_config=None, text_config=None, connector=None, vision_feature_layer=-2,
                 drop_cls=False, image_token_id=None, image_seq_length=64, image_brackets=None, image_bos_id=None,
                 image_size=384, image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5), logit_scale=None,
                 lm_head_bias=False, stage1=None, **kwargs):
        if isinstance(vision_config, dict):
            vision_config = AutoConfig.for_model(**{'model_type': 'siglip_vision_model', **vision_config})
        if isinstance(text_config, dict):
            text_config = AutoConfig.for_model(**{'model_type': 'qwen3', **text_config})
        # set before super().__init__, which hands attn_implementation down to the sub-configs
        self.vision_config = vision_config or AutoConfig.for_model('siglip_vision_model')
        self.text_config = text_config or AutoConfig.for_model('qwen3')
        self.connector = dict(connector or {})  # model.Connector's arguments (vision_dim, llm_dim, n_latents, ...)
        self.vision_feature_layer = vision_feature_layer  # the tower's layers after this one are dropped
        self.drop_cls = drop_cls  # CLIP towers prepend a CLS token; its feature is not a patch
        self.image_token_id = image_token_id  # the slot token: each image fills image_seq_length of them
        self.image_seq_length = image_seq_length
        self.image_brackets = list(image_brackets) if image_brackets else None  # (start, end) ids around the slots
        self.image_bos_id = image_bos_id  # the bos every sequence starts with, or None (the family has none)
        self.image_size, self.image_mean, self.image_std = image_size, list(image_mean), list(image_std)
        self.logit_scale = logit_scale  # what the LLM multiplies its logits by (Cohere), or None
        self.lm_head_bias = lm_head_bias
        self.stage1 = dict(stage1 or {})  # where the connector came from: backbones, data, step, val loss
        kwargs.setdefault('tie_word_embeddings', getattr(self.text_config, 'tie_word_embeddings', False))
        super().__init__(**kwargs)


__all__ = ['Stage1VLMConfig']
