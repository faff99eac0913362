"""
The processor of a Stage-1 VLM exported for transformers (`sample.py --export_hf`): images to
the pixels the tower was trained on, prompts with one '<image>' per image to token ids with
that image's slots, batches padded. Its chat template renders a user turn of images and text
exactly as stage 1's training prompt. Self-contained: transformers, PIL and numpy.
"""
import io  # noqa: F401 (the copied code uses it)

import numpy as np
import torch
from PIL import Image, ImageOps  # noqa: F401
from transformers.feature_extraction_utils import BatchFeature
from transformers.image_processing_utils import BaseImageProcessor
from transformers.processing_utils import ProcessorMixin

UserError = ValueError  # what the copied code raises for an input that cannot work

# Decoding and resizing, and the prompt's tokens: the stage-1 project's own code
# (sources/images.py, data.py), copied into this file when it is exported, so images and
# prompts become exactly the pixels and ids that trained.
from sources.images import to_rgb, load_image  # noqa: E402, F401 (export: copy)
from data import encode_prompt  # noqa: E402, F401 (export: copy)

IMAGE = '<image>'  # the marker of an image in a prompt


class Stage1VLMImageProcessor(BaseImageProcessor):
    """Any image (PIL, path, bytes) -> uint8 [3, size, size]: EXIF-transposed, RGB, resized as the
    tower's own processor resizes (size, shortest_edge then centre crop, resample). Normalising
    (image_mean / image_std) happens in the model, on the device."""
    model_input_names = ['pixel_values']

    def __init__(self, size=384, shortest_edge=None, resample=3, image_mean=(0.5, 0.5, 0.5),
                 image_std=(0.5, 0.5, 0.5), **kwargs):
        super().__init__(**kwargs)
        self.size, self.shortest_edge, self.resample = size, shortest_edge, resample
        self.image_mean, self.image_std = list(image_mean), list(image_std)

    def spec(self):
        return dict(size=self.size, shortest_edge=self.shortest_edge, resample=self.resample, mean=self.image_mean,
                    std=self.image_std)

    def __call__(self, images, return_tensors=None, **kwargs):
        return self.preprocess(images, return_tensors)

    def preprocess(self, images, return_tensors=None, **kwargs):
        images = flatten(images)
        pixels = np.stack([load_image(_pil(im), self.spec()) for im in images]) if images else \
            np.zeros((0, 3, self.size, self.size), np.uint8)
        return BatchFeature(dict(pixel_values=pixels), tensor_type=return_tensors)


class Stage1VLMProcessor(ProcessorMixin):
    """processor(images=..., text=...): one '<image>' in the text per image, in order (the
    chat template writes them); images may be flat or one list per text. Returns input_ids,
    attention_mask and uint8 pixel_values. bos: the family's, when add_special_tokens (the
    default) and the text does not start with it already."""
    attributes = ['image_processor', 'tokenizer']

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, image_seq_length=64,
                 image_token_id=None, image_brackets=None, image_bos_id=None, **kwargs):
        self.image_token = IMAGE
        self.image_seq_length, self.image_token_id = image_seq_length, image_token_id
        self.image_brackets = list(image_brackets) if image_brackets else None
        self.image_bos_id = image_bos_id
        super().__init__(image_processor, tokenizer, chat_template=chat_template)

    def __call__(self, images=None, text=None, padding=False, padding_side=None, return_tensors=None,
                 add_special_tokens=True, truncation=None, max_length=None, pad_to_multiple_of=None, **kwargs):
        images = flatten(images)
        out = {}
        if text is not None:
            texts = [text] if isinstance(text, str) else list(text)
            if sum(t.count(IMAGE) for t in texts) != len(images):
                raise ValueError(f'{len(images)} images for {sum(t.count(IMAGE) for t in texts)} {IMAGE} markers in '
                                 f'the text: write one {IMAGE} per image (apply_chat_template does)')
            ids = [self.encode(t, add_special_tokens) for t in texts]
            if truncation and max_length:
                if any(self.image_token_id in i[max_length:] for i in ids):
                    raise ValueError(f'max_length={max_length} would cut image slots: raise it (or None)')
                ids = [i[:max_length] for i in ids]
            out.update(self.tokenizer.pad({'input_ids': ids}, padding=padding or len(ids) > 1,
                                          padding_side=padding_side, pad_to_multiple_of=pad_to_multiple_of,
                                          return_attention_mask=True))
        if images:
            out.update(self.image_processor(images))
        return BatchFeature(out, tensor_type=return_tensors)

    def encode(self, text, add_special_tokens=True):
        """The token ids of one prompt, exactly as stage 1 built them."""
        ids = encode_prompt(self.tokenizer, text, self.image_seq_length, self.image_token_id, self.image_brackets)
        if add_special_tokens and self.image_bos_id is not None and ids[:1] != [self.image_bos_id]:
            ids = [self.image_bos_id] + ids
        return ids

    def post_process_image_text_to_text(self, generated_outputs, skip_special_tokens=True, **kwargs):
        return self.tokenizer.batch_decode(generated_outputs, skip_special_tokens=skip_special_tokens, **kwargs)

    @property
    def model_input_names(self):
        return ['input_ids', 'attention_mask', 'pixel_values']


def flatten(images):
    """None, one image, a list of images, or one list of images per text -> a flat list."""
    if images is None:
        return []
    if not isinstance(images, (list, tuple)):
        return [images]
    return [im for x in images for im in flatten(x)]


def _pil(image):
    """What load_image takes (a PIL image, a path, bytes) from that or from uint8 pixels (an array
    or tensor, HWC or CHW)."""
    if isinstance(image, torch.Tensor):
        image = image.cpu().numpy()
    if isinstance(image, np.ndarray):
        a = image.transpose(1, 2, 0) if image.ndim == 3 and image.shape[0] in (1, 3) else image
        return Image.fromarray(a.astype(np.uint8).squeeze())
    return image


__all__ = ['Stage1VLMProcessor', 'Stage1VLMImageProcessor']
