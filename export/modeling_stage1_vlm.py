"""
A Stage-1 VLM for transformers (`sample.py --export_hf`): a vision tower and a causal LLM, both
built from their own configs, joined by the connector that stage 1 trained (LayerNorm ->
Perceiver resampler -> MLP). Each <image> of a prompt is image_seq_length slot tokens whose
embeddings are overwritten with the connector's outputs for that image.

Laid out as transformers' own VLMs are (model.vision_tower / model.connector /
model.language_model, lm_head), so AutoModelForImageTextToText, generate(), the
image-text-to-text pipeline, PEFT and TRL's SFTTrainer (which reads the backbone's hidden
states and the output embeddings) all find what they look for. Self-contained: torch and
transformers only.
"""
import inspect
import math  # noqa: F401 (the copied code may use it)

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import AutoModel, GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_stage1_vlm import Stage1VLMConfig

UserError = ValueError  # what the copied code raises for a setting that cannot work

# The connector and the glue it needs: the stage-1 project's own code (model.py), copied into
# this file when it is exported, so what runs here is exactly what trained.
from model import ResamplerBlock, Connector, lm_logits, truncate_vision  # noqa: E402, F401 (export: copy)

# transformers 5.24 names the KV cache `cache`; earlier 5.x releases `past_key_values`
CACHE_KEY = 'cache' if 'cache' in CausalLMOutputWithPast.__dataclass_fields__ else 'past_key_values'


class Stage1VLMPreTrainedModel(PreTrainedModel):
    config_class = Stage1VLMConfig
    base_model_prefix = 'model'
    main_input_name = 'input_ids'
    input_modalities = ('image', 'text')
    supports_gradient_checkpointing = True
    _no_split_modules = ['Connector']
    _keep_in_fp32_modules = ['connector']  # trained with fp32 master weights; small next to the backbones
    _supports_sdpa = _supports_flash_attn = _supports_flex_attn = _supports_attention_backend = True


class Stage1VLMModel(Stage1VLMPreTrainedModel):
    """The backbone: images -> connector vectors written into the slots -> the LLM's decoder."""

    def __init__(self, config):
        super().__init__(config)
        self.vision_tower = truncate_vision(AutoModel.from_config(config.vision_config), config.vision_feature_layer)
        self.connector = Connector(**config.connector)
        self.language_model = AutoModel.from_config(config.text_config)
        # what the LLM calls its KV cache argument (`cache` from transformers 5.24), read once
        self.cache_arg = 'cache' if 'cache' in inspect.signature(self.language_model.forward).parameters \
            else 'past_key_values'
        self.post_init()

    def get_input_embeddings(self):
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.language_model.set_input_embeddings(value)

    def get_image_features(self, pixel_values):
        """[M, 3, S, S] images -> [M, image_seq_length, llm hidden]. uint8 pixels (what the
        processor returns) are normalised here, on the device, as in training; float pixels are
        taken as normalised already."""
        x = pixel_values
        if x.dtype == torch.uint8:
            mean = torch.tensor(self.config.image_mean, device=x.device).view(1, 3, 1, 1) * 255
            std = torch.tensor(self.config.image_std, device=x.device).view(1, 3, 1, 1) * 255
            x = (x.float() - mean) / std
        feats = self.vision_tower(pixel_values=x.to(self.vision_tower.dtype)).last_hidden_state
        return self.connector(feats[:, 1:] if self.config.drop_cls else feats)

    def forward(self, input_ids=None, pixel_values=None, attention_mask=None, position_ids=None, cache=None,
                past_key_values=None, inputs_embeds=None, use_cache=None, **kwargs):
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)
        # images go in where the prompt has slots: decoding steps (one new token) have none
        slots = None if input_ids is None else input_ids == self.config.image_token_id
        if pixel_values is not None and slots is not None and bool(slots.any()):
            image = self.get_image_features(pixel_values)
            if int(slots.sum()) != image.shape[0] * image.shape[1]:
                raise ValueError(f'{int(slots.sum())} image slot tokens for {image.shape[0]} images of '
                                 f'{image.shape[1]} slots: build the prompt with the processor (one <image> per image)')
            # row-major: batch row, then position, so the k-th <image> of a row gets its k-th image
            inputs_embeds = inputs_embeds.masked_scatter(slots.unsqueeze(-1), image.to(inputs_embeds.dtype))
        cache = cache if cache is not None else past_key_values
        if cache is not None:
            kwargs[self.cache_arg] = cache
        return self.language_model(inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                                   position_ids=position_ids, use_cache=use_cache, **kwargs)


class Stage1VLMForConditionalGeneration(Stage1VLMPreTrainedModel, GenerationMixin):

    def __init__(self, config):
        super().__init__(config)
        self.model = Stage1VLMModel(config)
        text = config.get_text_config()
        self.lm_head = nn.Linear(text.hidden_size, text.vocab_size, bias=config.lm_head_bias)
        self.logit_scale = config.logit_scale  # read by lm_logits, as on the LLM it came from
        if getattr(text, 'tie_word_embeddings', False):  # the head is the input embedding table
            emb = self.model.language_model.get_input_embeddings()
            name = next(n for n, m in self.model.language_model.named_modules() if m is emb)
            self._tied_weights_keys = {'lm_head.weight': f'model.language_model.{name}.weight'}
        self.post_init()

    def get_input_embeddings(self):
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.model.set_input_embeddings(value)

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def get_decoder(self):
        return self.model.language_model

    def forward(self, input_ids=None, pixel_values=None, attention_mask=None, position_ids=None, cache=None,
                past_key_values=None, inputs_embeds=None, labels=None, use_cache=None, logits_to_keep=0,
                num_items_in_batch=None, **kwargs):
        """With labels: the loss over the positions whose next token is a label (the image slots
        never are), lm_head applied at those positions only, never [B, T, vocab]; divided by
        num_items_in_batch when the trainer gives it (gradient accumulation), else their count.
        Without: logits of the last logits_to_keep positions (0: all), fp32."""
        out = self.model(input_ids=input_ids, pixel_values=pixel_values, attention_mask=attention_mask,
                         position_ids=position_ids, cache=cache, past_key_values=past_key_values,
                         inputs_embeds=inputs_embeds, use_cache=use_cache, **kwargs)
        h, loss, logits = out.last_hidden_state, None, None
        if labels is not None:
            if input_ids is not None:
                labels = labels.masked_fill(input_ids == self.config.image_token_id, -100)
            target = labels[:, 1:].to(h.device)
            keep = target != -100
            loss = F.cross_entropy(lm_logits(self, h[:, :-1][keep]), target[keep], reduction='sum')
            loss = loss / (num_items_in_batch if num_items_in_batch is not None else keep.sum().clamp(min=1))
        else:
            rows = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
            logits = lm_logits(self, h[:, rows])
        cache = out[CACHE_KEY] if CACHE_KEY in out else None
        return CausalLMOutputWithPast(loss=loss, logits=logits, hidden_states=out.hidden_states,
                                      attentions=out.attentions, **{CACHE_KEY: cache})


__all__ = ['Stage1VLMPreTrainedModel', 'Stage1VLMModel', 'Stage1VLMForConditionalGeneration']
