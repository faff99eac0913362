"""
The trained model as a transformers folder (`python sample.py --ckpt out/ckpt.pt --export_hf DIR`):
config.json with auto_map, the modeling / configuration / processing files, every weight
(backbones and connector) as sharded safetensors, the tokenizer, the image processor, a chat
template that renders the training prompt, generation_config.json and a model card.

    model = AutoModelForImageTextToText.from_pretrained(DIR, trust_remote_code=True)
    processor = AutoProcessor.from_pretrained(DIR, trust_remote_code=True)

The code files are this folder's templates with the project's own connector, image and prompt
code copied in (the lines marked `(export: copy)`): one copy of that code, the one that trains.
The folder is written beside DIR and renamed into place at the end, so a failure leaves no
folder that half-loads and an old export whole.
"""
import importlib
import inspect
import json
import os
import re
import shutil
import time

import torch

from configurator import Progress, UserError, check_out_dir, os_error

HERE = os.path.dirname(os.path.abspath(__file__))
CODE = ('configuration_stage1_vlm.py', 'modeling_stage1_vlm.py', 'processing_stage1_vlm.py')
COPY_LINE = re.compile(r'^from ([\w.]+) import ([\w, ]+?)\s+#.*\(export: copy\)\s*$')
SHARD_BYTES = 2 << 30  # a shard is held twice while it is written (its tensors, then its bytes)


def code_file(name):
    """A template's text with each `from X import a, b  # (export: copy)` line replaced by the
    source of a, b: self-contained, and the same code that trains."""
    out = []
    with open(os.path.join(HERE, name)) as f:
        for line in f:
            m = COPY_LINE.match(line)
            if m:
                module = importlib.import_module(m.group(1))
                line = '\n\n'.join(inspect.getsource(getattr(module, n.strip())) for n in m.group(2).split(','))
            out.append(line)
    return ''.join(out)


def chat_template(bos_text=''):
    """A user turn's images and text as training wrote them ('<image>\\n' per image, then each
    text and '\\n'), an assistant turn's text then eos: a user turn of one image and "Describe
    the image in one sentence." renders exactly stage 1's prompt (data.TEMPLATE_A)."""
    bos = "{{- '%s' -}}" % bos_text if bos_text else ''
    return bos + (
        "{%- for message in messages -%}"
        "{%- set end = eos_token if message['role'] == 'assistant' else '\\n' -%}"
        "{%- if message['content'] is string -%}{{ message['content'] }}{{ end }}"
        "{%- else -%}"
        "{%- for item in message['content'] -%}"
        "{%- if item['type'] == 'image' -%}{{ '<image>\\n' }}"
        "{%- elif item['type'] == 'text' -%}{{ item['text'] }}"
        "{%- if message['role'] != 'assistant' -%}{{ '\\n' }}{%- endif -%}"
        "{%- endif -%}"
        "{%- endfor -%}"
        "{%- if message['role'] == 'assistant' -%}{{ eos_token }}{%- endif -%}"
        "{%- endif -%}"
        "{%- endfor -%}")


def weights(vlm):
    """(name in the exported model, tensor) of every weight, without copies: the tower, the
    connector, the LLM's decoder and its head (left out when tied to the input embeddings)."""
    llm = vlm.llm
    dec = next(n for n, m in llm.named_modules() if m is llm.get_decoder())
    head = next(n for n, m in llm.named_modules() if m is llm.get_output_embeddings())
    yield from ((f'model.vision_tower.{k}', v) for k, v in vlm.vision.state_dict().items())
    yield from ((f'model.connector.{k}', v) for k, v in vlm.connector.state_dict().items())
    tied = getattr(llm.config.get_text_config(), 'tie_word_embeddings', False)
    for k, v in llm.state_dict().items():
        if k.startswith(dec + '.'):
            yield f'model.language_model.{k[len(dec) + 1:]}', v
        elif k.startswith(head + '.'):
            if not (tied and k == head + '.weight'):
                yield f'lm_head.{k[len(head) + 1:]}', v
        else:
            raise UserError(f"the LLM has a weight '{k}' outside its decoder and head: this family cannot be exported")


def write_weights(vlm, folder, dtype, shard_bytes=SHARD_BYTES):
    """Every weight as safetensors shards of at most shard_bytes, written one shard at a time:
    beyond the model, only that shard is ever held (in `dtype`; the connector stays fp32, as it
    trained). Returns the number of bytes written."""
    from safetensors.torch import save
    names, shard, size, total, done = [], {}, 0, 0, 0
    all_weights = list(weights(vlm))
    progress = Progress('export weights (MB)', sum(v.numel() * v.element_size() for _, v in all_weights) >> 20)

    def flush():
        nonlocal shard, size, done
        path = os.path.join(folder, f'model-{len(names) + 1:05d}.safetensors')
        with open(path, 'wb') as f:  # a plain write: a full disk is an OSError that says so
            f.write(save(shard, metadata={'format': 'pt'}))
        names.append((path, list(shard)))
        done += size
        progress(done >> 20)
        shard, size = {}, 0
    for name, v in all_weights:
        if v.is_floating_point():
            v = v.to(torch.float32 if name.startswith('model.connector.') else dtype)
        t = v.detach().to('cpu').contiguous()
        if shard and size + t.numel() * t.element_size() > shard_bytes:
            flush()
        shard[name] = t
        size += t.numel() * t.element_size()
        total += t.numel() * t.element_size()
    if shard:
        flush()
    if len(names) == 1:
        os.replace(names[0][0], os.path.join(folder, 'model.safetensors'))
        return total
    index = {}
    for k, (path, keys) in enumerate(names):
        final = f'model-{k + 1:05d}-of-{len(names):05d}.safetensors'
        os.replace(path, os.path.join(folder, final))
        index.update(dict.fromkeys(keys, final))
    with open(os.path.join(folder, 'model.safetensors.index.json'), 'w') as f:
        json.dump(dict(metadata=dict(total_size=total), weight_map=index), f, indent=2)
    return total


def run_numbers(ckpt, ckpt_path):
    """What the run reached: step, the last eval's losses (log.jsonl beside the checkpoint) and
    the report's caption scores (report/metrics.json), where they exist."""
    out = dict(step=ckpt.get('iter_num'), checkpoint=os.path.abspath(ckpt_path))
    folder = os.path.dirname(os.path.abspath(ckpt_path))
    try:
        with open(os.path.join(folder, 'log.jsonl')) as f:
            evals = [r for r in map(json.loads, f) if 'val_loss' in r and r['iter'] <= (out['step'] or 0)]
        if evals:
            out.update({k: evals[-1][k] for k in ('val_loss', 'val_loss_shuffled', 'val_loss_no_image')
                        if k in evals[-1]})
        with open(os.path.join(folder, 'report', 'metrics.json')) as f:
            val = json.load(f)['val']
        out.update({k: val[k] for k in ('cider_d', 'bleu4') if k in val})
    except (OSError, ValueError, KeyError):
        pass  # a checkpoint moved away from its run folder: fewer numbers, still an export
    return out


def model_card(folder, args, run, data_dir, dtype):
    name = folder.rstrip('/')
    numbers = ', '.join(f'{k} {v:.4g}' if isinstance(v, float) else f'{k} {v}' for k, v in run.items()
                        if k != 'checkpoint')
    return f'''---
base_model:
- {args['vision']}
- {args['llm']}
pipeline_tag: image-text-to-text
library_name: transformers
tags:
- stage1-alignment
- vision-language
datasets:
- {'liuhaotian/LLaVA-Pretrain' if 'llava' in (data_dir or '') else data_dir or 'unknown'}
---

# Stage-1 aligned VLM

A frozen vision tower (`{args['vision']}`, features of layer {args['vision_feature_layer']}) and a frozen LLM
(`{args['llm']}`) joined by a trained connector (LayerNorm -> Perceiver resampler with {args['n_latents']}
latents -> MLP), as LLaVA's stage 1 trains it: image-caption pairs (`{data_dir}`), loss on the caption
tokens only. The LLM was not trained: this is the starting point of stage 2 (instruction tuning), not
a chat model. Weights: the backbones in {str(dtype).removeprefix('torch.')}, the connector in float32.

Run: {numbers}.

Prompt (what the chat template renders for one image and this text): `<image>\\nDescribe the image in
one sentence.\\n`, then the caption and the end-of-text token; each `<image>` becomes {args['n_latents']}
slot tokens that the connector's output fills.

## Usage

```python
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

model = AutoModelForImageTextToText.from_pretrained("{name}", trust_remote_code=True)
processor = AutoProcessor.from_pretrained("{name}", trust_remote_code=True)
messages = [{{"role": "user", "content": [{{"type": "image"}},
                                         {{"type": "text", "text": "Describe the image in one sentence."}}]}}]
prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
inputs = processor(images=[Image.open("image.jpg")], text=prompt, return_tensors="pt")
out = model.generate(**inputs, max_new_tokens=64, do_sample=False)
print(processor.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
```

Stage 2 with TRL's `SFTTrainer` (LoRA on the LLM, the connector trainable): see the project's docs/stage2.md.
'''


def export_hf(ckpt_path, out_dir, dtype=torch.bfloat16, force=False, shard_bytes=SHARD_BYTES):
    """Writes the transformers folder of a checkpoint (or out_dir, or exported connector) to
    out_dir; returns (out_dir, bytes of weights)."""
    import sample  # the checkpoint loader the other commands use
    if os.path.isdir(out_dir) and os.listdir(out_dir) and not force:
        raise UserError(f"--export_hf folder '{out_dir}' exists and is not empty: give a new folder, or --force to "
                        f"replace it (the old one stays whole until the new one is complete)")
    check_out_dir(out_dir, '--export_hf')
    vlm, tok, ckpt = sample.from_checkpoint(ckpt_path, 'cpu', dtype)
    ckpt_path = sample.resolve_checkpoint(ckpt_path)
    tmp = f'{out_dir.rstrip(os.sep)}.tmp-{os.getpid()}'
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        os.makedirs(tmp)
        total = write_weights(vlm, tmp, dtype, shard_bytes)
        save_config_and_processor(vlm, tok, ckpt, ckpt_path, tmp, dtype)
        for name in CODE:  # over the templates save_pretrained copied: the self-contained files
            with open(os.path.join(tmp, name), 'w') as f:
                f.write(code_file(name))
        with open(os.path.join(tmp, 'README.md'), 'w') as f:
            f.write(model_card(out_dir, ckpt['model_args'], run_numbers(ckpt, ckpt_path),
                               ckpt.get('config', {}).get('data_dir'), dtype))
        _replace(tmp, out_dir)
    except OSError as e:
        raise os_error(e, out_dir, '--export_hf') from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir, total


def save_config_and_processor(vlm, tok, ckpt, ckpt_path, folder, dtype):
    from transformers import GenerationConfig

    from export.configuration_stage1_vlm import Stage1VLMConfig
    from export.processing_stage1_vlm import Stage1VLMImageProcessor, Stage1VLMProcessor
    args, spec, llm = ckpt['model_args'], vlm.image_spec, vlm.llm
    scale = getattr(llm, 'logit_scale', None)
    tok.padding_side = tok.init_kwargs['padding_side'] = 'left'  # batched generation; trainers say the side
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    pad = tok.pad_token_id if tok.pad_token_id is not None else vlm.eos_id
    config = Stage1VLMConfig(
        vision_config=vlm.vision.config.to_dict(), text_config=llm.config.to_dict(), connector=vlm.connector_args,
        vision_feature_layer=args['vision_feature_layer'], drop_cls=vlm.drop_cls, image_token_id=vlm.slot_id,
        image_seq_length=args['n_latents'], image_brackets=vlm.brackets, image_bos_id=vlm.bos_id,
        image_size=spec['size'], image_mean=spec['mean'], image_std=spec['std'],
        logit_scale=scale if isinstance(scale, (int, float)) else None,
        lm_head_bias=llm.get_output_embeddings().bias is not None,
        stage1=dict(vision=args['vision'], llm=args['llm'], tokenizer=args['tokenizer'],
                    data_dir=ckpt.get('config', {}).get('data_dir'), **run_numbers(ckpt, ckpt_path)),
        eos_token_id=vlm.eos_id, bos_token_id=tok.bos_token_id, pad_token_id=pad)  # the tokenizer's own ids
    config.dtype = str(dtype).removeprefix('torch.')
    config.auto_map = {'AutoConfig': 'configuration_stage1_vlm.Stage1VLMConfig',
                       'AutoModelForImageTextToText': 'modeling_stage1_vlm.Stage1VLMForConditionalGeneration'}
    config.architectures = ['Stage1VLMForConditionalGeneration']
    config.save_pretrained(folder)
    GenerationConfig(eos_token_id=vlm.eos_id, pad_token_id=pad, bos_token_id=tok.bos_token_id, do_sample=False,
                     max_new_tokens=64).save_pretrained(folder)
    images = Stage1VLMImageProcessor(size=spec['size'], shortest_edge=spec.get('shortest_edge'),
                                     resample=spec['resample'], image_mean=spec['mean'], image_std=spec['std'])
    bos = tok.convert_ids_to_tokens(vlm.bos_id) if vlm.bos_id is not None else ''
    processor = Stage1VLMProcessor(images, tok, chat_template=chat_template(bos), image_seq_length=args['n_latents'],
                                   image_token_id=vlm.slot_id, image_brackets=vlm.brackets, image_bos_id=vlm.bos_id)
    images.register_for_auto_class('AutoImageProcessor')
    processor.register_for_auto_class('AutoProcessor')
    processor.save_pretrained(folder)


def _replace(tmp, out_dir):
    """tmp becomes out_dir; an old out_dir goes only once the new one is in place."""
    old = None
    if os.path.isdir(out_dir):
        old = f'{out_dir.rstrip(os.sep)}.old-{os.getpid()}-{int(time.time())}'
        os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    if old:
        shutil.rmtree(old, ignore_errors=True)
