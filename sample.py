"""
Captions from a trained connector, the evaluation report, and the connector export.

$ python sample.py --ckpt out/ckpt.pt --image x.jpg                       # temperature 0.2, top_p 0.9
$ python sample.py --ckpt out/ckpt.pt --image x.jpg --greedy
$ python sample.py --ckpt out/ckpt.pt --image a.jpg --image b.jpg         # Template B: k-th <image> = k-th file
$ python sample.py --ckpt out/ckpt.pt --image photos/ --temperature 0.5 --num_samples 3
$ python sample.py --ckpt out/ckpt.pt --image x.jpg --prompt "<image>\\nWhat is in the image?\\n"
$ python sample.py --ckpt out/ckpt.pt --eval [--baseline]                 # report on val + golden + QA
$ python sample.py --ckpt out/ckpt.pt --bench coco --ann dataset_coco.json --images coco/   # COCO / NoCaps / Flickr30k
$ python sample.py --ckpt out/ckpt.pt --export connector/                 # the connector: safetensors + JSON
$ python sample.py --ckpt out/ckpt.pt --export_hf vlm/                    # a transformers model folder (stage 2)

--ckpt takes a checkpoint file, an out_dir (its ckpt.pt) or an exported connector folder.
"""
import argparse
import json
import os
import sys
import time

import torch

import data
import model as M
from configurator import UserError, atomic_write_bytes, check_out_dir, first_line, one_line_errors, resolve_device
from evaluation import benchmarks, evaluate
from sources.backbones import load_tokenizer, seeded
from sources.images import IMAGE_EXTS, load_image


def parse_args(argv):
    p = argparse.ArgumentParser(description='captions for images from a Stage-1 connector checkpoint')
    p.add_argument('--ckpt', default='out/ckpt.pt', help='ckpt.pt, an out_dir, or an exported connector directory')
    p.add_argument('--image', action='append', default=[], help='image file or directory (repeatable)')
    p.add_argument('--prompt', default=None, help="prompt text; '<image>' marks where each image goes "
                                                   '(default: the training template)')
    p.add_argument('--temperature', type=float, default=0.2, help='0.2-0.7 for captions (design notes); 0 = greedy')
    p.add_argument('--top_p', type=float, default=0.9)
    p.add_argument('--max_new_tokens', type=int, default=64)
    p.add_argument('--num_samples', type=int, default=1)
    p.add_argument('--greedy', action='store_true', help='argmax decoding (same as --temperature 0)')
    p.add_argument('--seed', type=int, default=1337)
    p.add_argument('--batch_size', type=int, default=32, help='prompts per forward pass')
    p.add_argument('--device', default='auto')
    p.add_argument('--dtype', default='auto', help="'auto' (bf16 on a GPU, fp32 on a CPU), bfloat16, float32")
    p.add_argument('--attn_implementation', default='sdpa', choices=['sdpa', 'eager', 'flash_attention_2'])
    p.add_argument('--export', default=None, help='write the connector as safetensors + JSON to this dir, then exit')
    p.add_argument('--export_hf', default=None, help='write a transformers model folder (every weight, code, '
                   'processor, chat template, model card) to this dir, then exit; --dtype: of the backbones '
                   '(auto: bfloat16)')
    p.add_argument('--force', action='store_true', help='--export_hf: replace a folder that is not empty')
    # evaluation mode
    p.add_argument('--eval', action='store_true', help='write an evaluation report (val split + golden set + QA)')
    p.add_argument('--data_dir', default=None, help='prepared dataset (default: the first the checkpoint trained on)')
    p.add_argument('--num', type=int, default=None, help='val samples to caption (default 500), or benchmark '
                                                          'images (default: all); 0: all')
    p.add_argument('--qa', default=None, help='QA sanity JSONL {image, question, answers} (default: the dataset\'s)')
    p.add_argument('--out', default=None, help='report folder (default: <ckpt dir>/report)')
    p.add_argument('--untrained', action='store_true', help='evaluate a freshly initialised connector instead')
    p.add_argument('--baseline', action='store_true', help='also evaluate the untrained connector, side by side')
    p.add_argument('--no_llm_check', action='store_true', help='skip the frozen-LLM check')
    # benchmark mode (benchmarks.py): greedy captions of a benchmark's images, scored as the COCO toolkit does
    p.add_argument('--bench', default=None, choices=benchmarks.BENCHMARKS, help='caption and score a benchmark '
                   '(report in <ckpt dir>/report/<bench>/ unless --out)')
    p.add_argument('--ann', default=None, help='benchmark file as distributed: dataset_coco.json, '
                   'captions_val2014.json, nocaps_val_4500_captions.json, dataset_flickr30k.json')
    p.add_argument('--images', default=None, help='the folder the benchmark file names its images under')
    p.add_argument('--split', default=None, help='Karpathy split files: train, restval, val or test (default)')
    p.add_argument('--instances', default=None, help='COCO instances_val2014.json for CHAIR (default: beside --ann)')

    def fail(msg):  # one line, like every other error
        raise UserError(f'{msg} (see python sample.py --help)')
    p.error = fail
    args = p.parse_args(argv)
    if args.num is None:
        args.num = 0 if args.bench else 500
    if args.bench and not (args.ann and args.images):
        raise UserError('--bench needs --ann FILE (the benchmark file) and --images DIR (its images)')
    for key in ('batch_size', 'num_samples', 'max_new_tokens'):
        if getattr(args, key) < 1:
            raise UserError(f'--{key} must be >= 1, got {getattr(args, key)}')
    if args.temperature < 0 or not 0 < args.top_p <= 1 or args.num < 0:
        raise UserError('need --temperature >= 0, 0 < --top_p <= 1 and --num >= 0')
    for key in ('out', 'export'):  # a folder to write in, checked before the model loads (export_hf checks its own)
        if getattr(args, key):
            check_out_dir(getattr(args, key), f'--{key}')
    return args


def expand_images(paths):
    """Files stay as given; a directory becomes its image files, sorted."""
    out = []
    for p in paths:
        if os.path.isdir(p):
            out += sorted(os.path.join(p, f) for f in os.listdir(p)
                           if f.lower().rpartition('.')[2] in IMAGE_EXTS)
        elif os.path.exists(p):
            out.append(p)
        else:
            raise UserError(f'image {p} not found')
    return out


def read_images(files, spec):
    """(pixels of the readable files, their names, [(file, why) of the others])."""
    pixels, names, skipped = [], [], []
    for f in files:
        try:
            pixels.append(load_image(f, spec))
            names.append(f)
        except Exception as e:  # one broken file must not cost the others their captions
            skipped.append((f, f'{type(e).__name__}: {str(e)[:100]}'))
    return pixels, names, skipped


def resolve_checkpoint(path):
    """A checkpoint file, an exported connector folder, or an out_dir (its ckpt.pt)."""
    if os.path.isdir(path) and not os.path.exists(os.path.join(path, 'connector_config.json')):
        if os.path.exists(os.path.join(path, 'ckpt.pt')):
            return os.path.join(path, 'ckpt.pt')
        raise UserError(f'{path} holds neither a ckpt.pt nor an exported connector (connector_config.json)')
    return path


def from_checkpoint(path, device='cpu', dtype=torch.float32, attn_implementation='sdpa'):
    """(model, tokenizer, ckpt) from a training checkpoint, an out_dir or an exported
    connector folder (sample.py --export)."""
    path = resolve_checkpoint(path)
    if os.path.isdir(path):
        from safetensors.torch import load_file
        try:
            with open(os.path.join(path, 'connector_config.json')) as f:
                args = {**M.MODEL_DEFAULTS, **json.load(f)}
            state = load_file(os.path.join(path, 'connector.safetensors'))
        except Exception as e:
            raise UserError(f'exported connector in {path} is unreadable ({first_line(e, 100)}); export it again '
                            f'with sample.py --export') from None
        ckpt = dict(model_args=args)
    else:
        ckpt = M.load_checkpoint(path)
        args, state = ckpt['model_args'], ckpt['connector']
    tok = load_tokenizer(args['tokenizer'])
    model = M.build_vlm(args, tok, device, dtype, connector_state=state, attn_implementation=attn_implementation)
    return model.eval(), tok, ckpt


def untrained_connector(vlm, args, seed):
    """The state of a connector as training initialises it, drawn from `seed`, on the
    backbones already loaded: the baseline every trained connector is compared with."""
    out_rms = M.embedding_rms(vlm.llm) if args['match_embed_scale'] else None
    device = vlm.pix_mean.device
    with seeded(device, seed):
        c = M.new_connector(args, vlm.connector_args['vision_dim'], vlm.connector_args['llm_dim'], out_rms, device)
    return c.state_dict()


def export_connector(ckpt_path, out_dir):
    """Connector weights as safetensors + a JSON of the model config: the artifact to share."""
    from safetensors.torch import save
    ckpt = M.load_checkpoint(resolve_checkpoint(ckpt_path))
    tensors = {k: v.contiguous() for k, v in ckpt['connector'].items()}
    atomic_write_bytes(os.path.join(out_dir, 'connector.safetensors'), save(tensors))
    atomic_write_bytes(os.path.join(out_dir, 'connector_config.json'),
                       json.dumps(ckpt['model_args'], indent=2).encode())
    return out_dir


def main_eval(args, vlm, tok, ckpt, device):
    model_args = dict(ckpt['model_args'], checkpoint=args.ckpt)
    baseline = untrained_connector(vlm, ckpt['model_args'], args.seed) if args.untrained or \
        args.baseline else None
    if args.untrained:  # the untrained connector alone
        vlm.connector.load_state_dict(baseline)
        model_args['checkpoint'] += ' (untrained connector)'
        baseline = None
    cfg = ckpt.get('config', {})
    if args.data_dir:
        prepared = data.open_prepared(args.data_dir)
    elif cfg.get('data_dir'):  # the (first) dataset it was trained on
        prepared = data.open_prepared(data.parse_data_dir(cfg['data_dir'])[0][0], cfg.get('image_root', ''))
    else:
        raise UserError('give --data_dir (the prepared dataset to evaluate on)')
    ckpt_dir = os.path.dirname(os.path.abspath(resolve_checkpoint(args.ckpt)))
    out = args.out or os.path.join(ckpt_dir, 'report')
    log_path = os.path.join(ckpt_dir, 'log.jsonl')
    m = evaluate.evaluate(vlm, tok, model_args, prepared, out, num=args.num, qa_path=args.qa,
                          temperature=0.0 if args.greedy else args.temperature, top_p=args.top_p,
                          max_new_tokens=args.max_new_tokens, seed=args.seed, batch_size=args.batch_size,
                          llm_check=not args.no_llm_check, baseline=baseline,
                          log_path=log_path if os.path.exists(log_path) else None)
    print(evaluate.summary_line(m))
    print(f'report: {os.path.join(out, "report.md")}')


def main_bench(args):
    """--bench: the benchmark file is read first (its mistakes cost no model load)."""
    b = benchmarks.read_benchmark(args.bench, args.ann, args.images, args.split, args.num)
    benchmarks.check_instances(args.instances)
    device, dtype = resolve_device(args.device, args.dtype)
    vlm, tok, ckpt = from_checkpoint(args.ckpt, device, dtype, args.attn_implementation)
    label = args.ckpt
    if args.untrained:  # the connector as training initialises it: the baseline for the scores
        vlm.connector.load_state_dict(untrained_connector(vlm, ckpt['model_args'], args.seed))
        label += ' (untrained connector)'
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(resolve_checkpoint(args.ckpt))), 'report',
                                   args.bench)
    m = benchmarks.run_bench(vlm, tok, b, out, label, args.prompt, args.max_new_tokens, args.batch_size,
                             args.instances)
    print(benchmarks.summary_line(m))
    print(f'report: {os.path.join(out, "report.md")}; results file: {os.path.join(out, "results.json")}')
    return 0


def main(argv):
    args = parse_args(argv)
    if args.export:
        print(f'exported connector to {export_connector(args.ckpt, args.export)}')
        return 0
    if args.export_hf:
        from export.hf import export_hf
        t0 = time.time()
        _, dtype = resolve_device('cpu', 'bfloat16' if args.dtype == 'auto' else args.dtype)
        folder, size = export_hf(args.ckpt, args.export_hf, dtype, args.force)
        print(f'exported a transformers model ({size / 2**20:,.0f} MB of weights) to {folder} in '
              f'{time.time() - t0:.0f}s: AutoModelForImageTextToText.from_pretrained({folder!r}, '
              f'trust_remote_code=True)')
        return 0
    if args.bench:
        return main_bench(args)
    if not args.eval and not args.image:
        raise UserError('give at least one --image (a file or a directory), or --eval')
    files = expand_images(args.image) if not args.eval else []
    device, dtype = resolve_device(args.device, args.dtype)
    vlm, tok, ckpt = from_checkpoint(args.ckpt, device, dtype, args.attn_implementation)
    if args.eval:
        return main_eval(args, vlm, tok, ckpt, device)
    pixels, names, skipped = read_images(files, vlm.image_spec)
    if not pixels:
        raise UserError(f'none of the {len(files)} image(s) could be read ({skipped[0][0]}: {skipped[0][1]})'
                        if files else 'no image files (.jpg, .png, ...) in the given directory')
    for f, why in skipped:
        print(f'skipped {f}: {why}', file=sys.stderr)
    temperature = 0.0 if args.greedy else args.temperature
    gen = torch.Generator(device=device).manual_seed(args.seed)  # sampled where the logits are
    n_markers = args.prompt.replace('\\n', '\n').count('<image>') if args.prompt else 0
    if (len(args.image) > 1 and all(os.path.isfile(f) for f in args.image)) or n_markers > 1:
        if skipped:
            raise UserError('a multi-image prompt needs every image; fix or drop the skipped file(s) above')
        groups, names = [pixels], [' + '.join(names)]  # several files: one multi-image prompt
    else:
        groups = [[p] for p in pixels]
    for _ in range(args.num_samples):
        caps = evaluate.caption_batch(vlm, tok, groups, args.prompt, temperature, args.top_p, args.max_new_tokens,
                                      gen, args.batch_size)
        for name, cap in zip(names, caps):
            print(f'{name}: {cap}' if len(names) > 1 or args.num_samples > 1 or skipped else cap)
    return 0


if __name__ == '__main__':
    one_line_errors()
    sys.exit(main(sys.argv[1:]))
