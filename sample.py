"""
Captions from a trained connector.

$ python sample.py --ckpt out/ckpt.pt --image x.jpg                       # greedy caption
$ python sample.py --ckpt out/ckpt.pt --image a.jpg --image b.jpg         # Template B: k-th <image> = k-th file
$ python sample.py --ckpt out/ckpt.pt --image photos/ --temperature 0.5 --num_samples 3
$ python sample.py --ckpt out/ckpt.pt --image x.jpg --prompt "<image>\nWhat is in the image?\n"
"""
import argparse
import os
import sys

import numpy as np
import torch

import data
import model as M

IMAGE_EXTS = ('.jpg', '.jpeg', '.png', '.webp', '.bmp', '.gif', '.tif', '.tiff')


def parse_args(argv):
    p = argparse.ArgumentParser(description='captions for images from a Stage-1 connector checkpoint')
    p.add_argument('--ckpt', default='out/ckpt.pt', help='ckpt.pt, or an exported connector directory')
    p.add_argument('--image', action='append', default=[], help='image file or directory (repeatable)')
    p.add_argument('--prompt', default=None, help="prompt text; '<image>' marks where each image goes "
                                                   '(default: the training template)')
    p.add_argument('--temperature', type=float, default=0.0, help='0 = greedy; 0.2-0.7 for sampling')
    p.add_argument('--top_p', type=float, default=0.9)
    p.add_argument('--max_new_tokens', type=int, default=64)
    p.add_argument('--num_samples', type=int, default=1)
    p.add_argument('--greedy', action='store_true', help='same as --temperature 0')
    p.add_argument('--seed', type=int, default=1337)
    p.add_argument('--batch_size', type=int, default=32, help='prompts per forward pass')
    p.add_argument('--device', default='auto')
    p.add_argument('--dtype', default='auto')
    p.add_argument('--export', default=None, help='write the connector as safetensors + JSON to this dir, then exit')
    return p.parse_args(argv)


def setup(ckpt_path, device='auto', dtype='auto'):
    device = torch.device(('cuda' if torch.cuda.is_available() else 'cpu') if device == 'auto' else device)
    if dtype == 'auto':
        dtype = 'bfloat16' if device.type == 'cuda' else 'float32'
    vlm, tok, ckpt = M.from_checkpoint(ckpt_path, device, {'bfloat16': torch.bfloat16, 'float32': torch.float32}[dtype])
    return vlm, tok, ckpt, device


def expand_images(paths):
    """Files stay as given; a directory becomes its image files, sorted."""
    out = []
    for p in paths:
        if os.path.isdir(p):
            out += sorted(os.path.join(p, f) for f in os.listdir(p) if f.lower().endswith(IMAGE_EXTS))
        elif os.path.exists(p):
            out.append(p)
        else:
            raise SystemExit(f'error: image {p} not found')
    return out


def read_image(path, vlm):
    try:
        return data.load_image(path, vlm.image_spec['size'], vlm.image_spec['resample'])
    except Exception as e:
        raise SystemExit(f'error: cannot read image {path} ({type(e).__name__}: {e})') from None


def prompt_ids(vlm, tok, n_images, prompt=None):
    """The training template for 1 or 2 images, or a user prompt (images prepended when it
    has no '<image>' marker)."""
    if prompt is None:
        prompt = data.TEMPLATE_A if n_images == 1 else data.TEMPLATE_B
    prompt = prompt.replace('\\n', '\n')
    if '<image>' not in prompt:
        prompt = '<image>\n' * n_images + prompt
    if prompt.count('<image>') != n_images:
        raise SystemExit(f"error: the prompt has {prompt.count('<image>')} <image> markers for {n_images} images")
    if not prompt.endswith('\n'):
        prompt += '\n'  # the caption follows a newline in training
    return data.encode_prompt(tok, prompt, vlm.connector.args['n_latents'], vlm.slot_id)


def caption_batch(vlm, tok, image_groups, prompt=None, temperature=0.0, top_p=0.9, max_new_tokens=64,
                  generator=None, batch_size=32):
    """image_groups: one list of uint8 [3, H, W] arrays per prompt. Returns decoded captions.
    Prompts run batch_size at a time, so a thousand captions are a few dozen forward passes."""
    device = vlm.pix_mean.device
    out = []
    for s in range(0, len(image_groups), batch_size):
        groups = image_groups[s:s + batch_size]
        prompts = [prompt_ids(vlm, tok, len(g), prompt) for g in groups]
        imgs = torch.from_numpy(np.stack([im for g in groups for im in g])).to(device)
        new = vlm.generate(imgs, prompts, max_new_tokens, temperature, top_p, generator)
        out += [tok.decode(t, skip_special_tokens=True).strip() for t in new]
    return out


def main(argv):
    args = parse_args(argv)
    if args.export:
        print(f'exported connector to {M.export_connector(args.ckpt, args.export)}')
        return
    files = expand_images(args.image)
    if not files:
        raise SystemExit('error: give at least one --image (a file or a directory)')
    vlm, tok, ckpt, device = setup(args.ckpt, args.device, args.dtype)
    temperature = 0.0 if args.greedy else args.temperature
    gen = torch.Generator(device='cpu').manual_seed(args.seed)
    n_markers = args.prompt.replace('\\n', '\n').count('<image>') if args.prompt else 0
    if len(args.image) > 1 and all(os.path.isfile(f) for f in args.image) or n_markers > 1:
        groups = [[read_image(f, vlm) for f in files]]  # several files: one multi-image prompt
        names = [' + '.join(files)]
    else:
        groups = [[read_image(f, vlm)] for f in files]
        names = files
    for k in range(args.num_samples):
        caps = caption_batch(vlm, tok, groups, args.prompt, temperature, args.top_p, args.max_new_tokens, gen,
                             args.batch_size)
        for name, cap in zip(names, caps):
            print(f'{name}: {cap}' if len(names) > 1 or args.num_samples > 1 else cap)


if __name__ == '__main__':
    main(sys.argv[1:])
